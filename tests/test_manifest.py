"""Bad manifests stop with an error naming the file, the line and the utterance."""

import numpy as np
import pytest
import soundfile

from sb_crossmodal_kd.data.manifest import ManifestError, check_manifest


def _wav(path, rate=16000):
    soundfile.write(str(path), np.zeros(1600, dtype=np.float32), rate)
    return path


def _csv(tmp_path, rows, header="ID,duration,wav,spk_id,wrd"):
    path = tmp_path / "m.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_good_manifest_with_data_root(tmp_path):
    _wav(tmp_path / "a.wav")
    path = _csv(tmp_path, ["u1,0.1,$data_root/a.wav,s1,hello world"])
    rows = check_manifest(path, replacements={"data_root": tmp_path})
    assert rows[0]["wav"] == f"{tmp_path}/a.wav"


def test_missing_column_is_named(tmp_path):
    path = _csv(tmp_path, ["u1,0.1,a.wav,s1"], header="ID,duration,wav,spk_id")
    with pytest.raises(ManifestError, match=r"m\.csv: missing column\(s\) wrd"):
        check_manifest(path)


def test_empty_transcript_names_line_and_utterance(tmp_path):
    _wav(tmp_path / "a.wav")
    path = _csv(tmp_path, [f"u1,0.1,{tmp_path}/a.wav,s1,hi", f"u2,0.1,{tmp_path}/a.wav,s1,  "])
    with pytest.raises(ManifestError, match=r"line 3 \(utterance u2\): empty transcript"):
        check_manifest(path)


def test_missing_and_corrupt_audio(tmp_path):
    path = _csv(tmp_path, [f"u1,0.1,{tmp_path}/nope.wav,s1,hi"])
    with pytest.raises(ManifestError, match=r"line 2 \(utterance u1\): audio file .*nope.wav"):
        check_manifest(path)
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    path = _csv(tmp_path, [f"u1,0.1,{tmp_path}/bad.wav,s1,hi"])
    with pytest.raises(ManifestError, match=r"utterance u1\): cannot read audio"):
        check_manifest(path)


def test_a_truncated_file_is_refused_naming_its_row(tmp_path):
    # A 300-byte wav (about 0.01 s) whose row says 0.4 s: a copy that was cut short.
    wav = tmp_path / "cut.wav"
    soundfile.write(str(wav), np.zeros(128, dtype=np.float32), 16000, subtype="PCM_16")
    assert wav.stat().st_size < 400
    good = _wav(tmp_path / "a.wav")
    path = _csv(tmp_path, [f"u1,0.1,{good},s,hi", f"u2,0.4,{wav},s,there"])
    with pytest.raises(ManifestError, match=r"line 3 \(utterance u2\): the manifest says 0.4 s "
                                            r"but .*cut.wav holds 0.008 s"):
        check_manifest(path)
    assert check_manifest(_csv(tmp_path, [f"u1,0.105,{good},s,hi"]))  # rounding passes


def test_duplicate_id_bad_duration_and_another_sample_rate(tmp_path, caplog):
    wav = _wav(tmp_path / "a.wav", rate=8000)
    with pytest.raises(ManifestError, match="duplicate ID 'u1'"):
        check_manifest(_csv(tmp_path, [f"u1,0.2,{wav},s,a", f"u1,0.2,{wav},s,b"]))
    with pytest.raises(ManifestError, match="duration 'x' is not a number"):
        check_manifest(_csv(tmp_path, [f"u1,x,{wav},s,a"]))
    # Telephone audio is accepted, and the log says once that it will be resampled.
    with caplog.at_level("INFO", logger="sb_crossmodal_kd.data.manifest"):
        check_manifest(_csv(tmp_path, [f"u1,0.2,{wav},s,a", f"u2,0.2,{wav},s,b"]),
                       sample_rate=16000)
    assert caplog.text.count("resampled on load") == 1
    assert "2 of 2 audio files are not at 16000 Hz (2 at 8000 Hz)" in caplog.text
