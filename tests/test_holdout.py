from pathlib import Path

from featcodec.holdout import split_held_out


def test_held_out_set_depends_on_paths_only(tmp_path):
    root = tmp_path / "data"
    files = [root / "images" / f"img{i:03d}.jpg" for i in range(50)]
    held, rest = split_held_out(files, root, 10)
    assert len(held) == 10 and len(rest) == 40 and not set(held) & set(rest)
    assert [p for p in files if p in held] == held  # the caller's order is kept
    moved = [Path("/elsewhere") / p.relative_to(root) for p in reversed(files)]
    held_moved, _ = split_held_out(moved, "/elsewhere", 10)
    assert sorted(p.relative_to("/elsewhere") for p in held_moved) == sorted(p.relative_to(root) for p in held)
    assert split_held_out(files, root, 0) == ([], files)
