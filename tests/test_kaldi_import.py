"""Kaldi import: an ark/scp round trip through kaldiio into monophone and senone frame labels."""

import kaldiio
import numpy as np
import pytest

from sb_crossmodal_kd.alignment.framerate import AlignmentLengthError, FrameRate
from sb_crossmodal_kd.alignment.kaldi import import_kaldi, read_int_alignments, read_phone_table
from sb_crossmodal_kd.units.phones import PHONES

PHONES_TXT = "<eps> 0\nSIL 1\nSPN 2\nK_B 3\nAE1_I 4\nT_E 5\nDH_B 6\nAH0_E 7\n#0 8\n"


def _planted(n_samples=16000 * 1):
    """A 1 s utterance: Kaldi frames (25 ms window, snip edges) labelled sil K AE T sil."""
    n_kaldi = 1 + (n_samples - 400) // 160  # 98 frames
    runs = [(1, 20), (3, 12), (4, 24), (5, 16), (1, n_kaldi - 72)]
    phones = np.concatenate([np.full(n, p, dtype=np.int32) for p, n in runs])
    # pdf-ids: three states per phone run, silence pdfs 0..2, others from 10 on.
    pdfs, next_pdf = [], 10
    for p, n in runs:
        thirds = np.array_split(np.arange(n), 3)
        for s, part in enumerate(thirds):
            pdfs += [s if p == 1 else next_pdf + s] * len(part)
        next_pdf += 3 if p != 1 else 0
    return phones, np.asarray(pdfs, dtype=np.int32), n_samples


def test_ark_and_scp_round_trip_to_unit_streams(tmp_path):
    phones, pdfs, n_samples = _planted()
    kaldiio.save_ark(str(tmp_path / "phones.ark"), {"utt1": phones}, scp=str(tmp_path / "p.scp"))
    kaldiio.save_ark(str(tmp_path / "pdf.ark"), {"utt1": pdfs})
    (tmp_path / "phones.txt").write_text(PHONES_TXT)
    assert read_int_alignments(tmp_path / "p.scp")["utt1"].tolist() == phones.tolist()

    rate = FrameRate()
    for source in (tmp_path / "phones.ark", tmp_path / "p.scp"):
        streams = import_kaldi(
            source, tmp_path / "phones.txt", tmp_path / "pdf.ark", n_samples={"utt1": n_samples}
        )["utt1"]
        n_enc = rate.frames_for_samples(n_samples)
        assert [PHONES[i] for i in streams["monophone.units"]] == ["K", "AE", "T"]
        assert len(streams["monophone.frame_to_position"]) == n_enc
        assert len(streams["monophone.frame_labels"]) == n_enc
        assert len(streams["feature_positions"]) == rate.feature_frames(n_samples)
        # Kaldi frame i is centred at 12.5 ms + 10 ms * i: K starts at Kaldi frame 20, i.e.
        # 212.5 ms, which is our feature frame 21 (centred at 210 ms, nearest).
        feat = streams["feature_positions"]
        assert feat[20] == -1 and feat[21] == 0
        # Encoder labels agree with the feature-rate labels at each encoder frame's centre.
        centre = np.minimum(np.arange(n_enc) * 4, len(feat) - 1)
        agree = (streams["monophone.frame_to_position"] == feat[centre]).mean()
        assert agree > 0.85
        assert set(streams["monophone.frame_labels"].tolist()) == {0, 20, 2, 31}  # sil K AE T
        # Senones: the pdf run sequence, with positions covering every frame.
        assert streams["senone.units"].tolist() == [0, 1, 2, 10, 11, 12, 13, 14, 15, 16, 17,
                                                     18, 0, 1, 2]
        assert (streams["senone.frame_to_position"] >= 0).all()
        assert (np.diff(streams["senone.frame_to_position"]) >= 0).all()


def test_centre_mode_takes_the_centre_frame(tmp_path):
    phones, _, n_samples = _planted()
    (tmp_path / "phones.txt").write_text(PHONES_TXT)
    streams = import_kaldi({"u": phones}, tmp_path / "phones.txt", mode="centre",
                           n_samples={"u": n_samples})["u"]
    feat = streams["feature_positions"]
    centre = np.minimum(np.arange(len(streams["monophone.frame_to_position"])) * 4, len(feat) - 1)
    assert streams["monophone.frame_to_position"].tolist() == feat[centre].tolist()


def test_bad_inputs_name_the_problem(tmp_path):
    phones, pdfs, n_samples = _planted()
    (tmp_path / "phones.txt").write_text(PHONES_TXT)
    with pytest.raises(AlignmentLengthError, match="'utt1'"):
        import_kaldi({"utt1": phones}, tmp_path / "phones.txt", n_samples={"utt1": 2 * n_samples})
    with pytest.raises(ValueError, match="'utt1'.*pdf alignment has 10 frames"):
        import_kaldi({"utt1": phones}, tmp_path / "phones.txt", {"utt1": pdfs[:10]})
    (tmp_path / "bad.txt").write_text("<eps> 0\nQQ_B 1\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: Kaldi phone 'QQ_B'"):
        read_phone_table(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="phone ids \\[99\\]"):
        import_kaldi({"utt1": np.array([1, 99])}, tmp_path / "phones.txt")
