"""`sbkd build-tree` and `sbkd export-units` reading the shards folder `sbkd align` writes: the
same tree and store as from the one-document file, the same bytes for any --jobs, and a bad
shards folder (a shard missing, cut short or from other settings, or another manifest)
refused in one line with exit status 2 before any work."""

import csv
import json

import numpy as np
import pytest
from test_units_commands import _manifest

from sb_crossmodal_kd.alignment.corpus import read_manifest
from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner
from sb_crossmodal_kd.alignment.sharded import align_split, shard_path, split_tree_statistics
from sb_crossmodal_kd.cli import main, run_reporting_errors
from sb_crossmodal_kd.units.lexicon import Lexicon
from sb_crossmodal_kd.units.senones import SenoneTree
from sb_crossmodal_kd.units.store import UnitStore

SHARD = 2  # rows per shard: 7 rows make 4 shards, the last of one row
TREE = ["--oov-policy", "skip", "--min-count", "5", "--min-gain", "1", "--max-leaves", "300"]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A tiny aligner (``aligner.pt``), a 7-row manifest aligned into ``shards/`` and into
    the one-document ``document.json``."""
    folder = tmp_path_factory.mktemp("sharded_commands")
    rng = np.random.default_rng(0)
    train = _manifest(folder, "train", 10, rng)
    split = _manifest(folder, "split", 7, rng)
    lexicon = Lexicon.load(None, oov_policy="skip")
    aligner = PhoneAligner(lexicon, AlignerSettings(iterations=1, epochs=1, hidden=16,
                                                    init="ctc", ctc_epochs=1))
    aligner.train([(r["ID"], r["wav"], r["wrd"]) for r in read_manifest(train)], progress=False)
    aligner.save(folder / "aligner.pt")
    align_split(folder / "aligner.pt", split, folder / "shards", oov_policy="skip",
                document=folder / "document.json", header={"manifest": str(split)},
                shard_size=SHARD)
    return folder, split


def build_tree(folder, split, source, output, *extra):
    main(["build-tree", *source, "--manifest", str(split), "--aligner",
          str(folder / "aligner.pt"), "--output", str(output), *TREE, *extra])
    return output.read_bytes()


def test_build_tree_from_shards_is_the_documents_tree_for_any_jobs(aligned, tmp_path):
    folder, split = aligned
    shards = ["--shards", str(folder / "shards")]
    one = build_tree(folder, split, shards, tmp_path / "one.json")
    assert build_tree(folder, split, shards, tmp_path / "two.json", "--jobs", "2") == one
    document = ["--alignments", str(folder / "document.json")]
    assert build_tree(folder, split, document, tmp_path / "document.json") == one
    # The prep chain's tree: the same function over the same shards.
    from sb_crossmodal_kd.alignment.sharded import open_shards

    stats = split_tree_statistics(open_shards(folder / "shards", split, folder / "aligner.pt",
                                              oov_policy="skip"),
                                  split, folder / "aligner.pt", oov_policy="skip")
    SenoneTree.build(stats, max_leaves=300, min_count=5, min_gain=1.0).save(tmp_path / "p.json")
    assert (tmp_path / "p.json").read_bytes() == one


def test_export_units_from_shards_is_the_documents_store_for_any_jobs(aligned, tmp_path):
    folder, split = aligned
    common = ["--manifest", str(split), "--oov-policy", "skip"]
    # --aligner left out: the aligner.pt next to the shards folder, where `sbkd align` puts it.
    for jobs in ("1", "2"):
        main(["export-units", "--shards", str(folder / "shards"), *common, "--jobs", jobs,
              "--output", str(tmp_path / f"jobs{jobs}.units")])
    main(["export-units", "--alignments", str(folder / "document.json"), *common,
          "--output", str(tmp_path / "document.units")])
    expected = (tmp_path / "document.units").read_bytes()
    assert (tmp_path / "jobs1.units").read_bytes() == expected
    assert (tmp_path / "jobs2.units").read_bytes() == expected
    from_shards, from_document = UnitStore(tmp_path / "jobs2.units"), UnitStore(
        tmp_path / "document.units")
    assert from_shards.ids() == from_document.ids() and len(from_shards) > 0
    for utt in from_document.ids():
        assert {name: values.tolist() for name, values in from_shards[utt].items()} == {
            name: values.tolist() for name, values in from_document[utt].items()}
    assert not (tmp_path / "jobs2.units.parts").exists()


def refused(argv, capsys):
    """The one stderr line of ``sbkd ARGV`` failing as the console script reports it."""
    with pytest.raises(SystemExit) as stopped:
        run_reporting_errors(main, argv, f"sbkd {argv[0]}")
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def broken(aligned, tmp_path):
    """A copy of the shards folder (and the aligner next to it), to break."""
    folder, split = aligned
    (tmp_path / "aligner.pt").write_bytes((folder / "aligner.pt").read_bytes())
    copy = tmp_path / "shards"
    copy.mkdir()
    for path in sorted((folder / "shards").glob("shard-*.jsonl")):
        (copy / path.name).write_bytes(path.read_bytes())
    return copy, split


def tree_argv(shards, split, *extra):
    return ["build-tree", "--shards", str(shards), "--manifest", str(split), "--aligner",
            str(shards.parent / "aligner.pt"), "--output", str(shards.parent / "tree.json"),
            *TREE, *extra]


def test_a_truncated_missing_or_other_settings_shard_is_refused_by_name(broken, capsys):
    shards, split = broken
    cut = shard_path(shards, 2).read_bytes()
    shard_path(shards, 2).write_bytes(cut[: cut.rindex(b"\n", 0, -1) + 1])  # no end mark
    line = refused(tree_argv(shards, split), capsys)
    assert line.startswith(f"sbkd build-tree: error: {shard_path(shards, 2)}: incomplete; ")
    assert "re-run `sbkd align`" in line and "same --output" in line
    units = ["export-units", "--shards", str(shards), "--manifest", str(split), "--oov-policy",
             "skip", "--output", str(shards.parent / "x.units")]
    assert str(shard_path(shards, 2)) in refused(units, capsys)
    assert not (shards.parent / "tree.json").exists() and not (shards.parent / "x.units").exists()

    shard_path(shards, 2).unlink()
    assert f"{shard_path(shards, 2)}: missing; " in refused(tree_argv(shards, split), capsys)

    lines = shard_path(shards, 1).read_text().splitlines(keepends=True)
    lines[0] = json.dumps({**json.loads(lines[0]), "settings": "another aligner"}) + "\n"
    shard_path(shards, 1).write_text("".join(lines))
    line = refused(tree_argv(shards, split), capsys)
    assert f"{shard_path(shards, 1)}: built with another aligner, lexicon or --text-key" in line


def test_a_manifest_of_other_rows_is_refused_naming_it(broken, capsys):
    shards, split = broken
    rows = read_manifest(split)
    rows[3]["wrd"] = "sam sam sam"
    other = shards.parent / "other.csv"
    with open(other, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    line = refused(tree_argv(shards, other), capsys)
    assert line.startswith(f"sbkd build-tree: error: {other}: its rows are not the ones ")
    with open(other, "w", newline="") as f:  # fewer rows than were aligned
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:3])
    assert refused(tree_argv(shards, other), capsys).startswith(
        f"sbkd build-tree: error: {other}: its 3 rows are not the ones ")


def test_jobs_is_checked_before_any_work(broken, capsys):
    shards, split = broken
    assert "jobs must be a positive number" in refused(tree_argv(shards, split, "--jobs", "0"),
                                                       capsys)
    document = ["build-tree", "--alignments", "missing.json", "--manifest", str(split),
                "--aligner", "missing.pt", "--output", "t.json", "--jobs", "2"]
    assert "give the shards folder (--shards" in refused(document, capsys)
