"""expand_inputs: files, folders, globs and stdin, with unique output keys."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from slimseg.cli.inputs import ImageInput, expand_inputs
from slimseg.errors import SlimsegError, UsageError


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not decoded here")


def _pairs(inputs: list[ImageInput]) -> list[tuple[str, str]]:
    return [(p.path.as_posix(), p.key) for p in inputs]


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small photo tree; the test runs inside tmp_path so relative specs work."""
    _touch(
        tmp_path,
        "photos/b.jpg",
        "photos/a.PNG",
        "photos/notes.txt",
        "photos/.hidden.jpg",
        "photos/c.tiff",
        "photos/trip/day1/x.jpeg",
        "photos/trip/y.webp",
        "photos/.cache/z.jpg",
        "photos/trip/readme.md",
        "other/a.bmp",
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_image_input_is_frozen() -> None:
    item = ImageInput(path=Path("a.jpg"), key="a")
    with pytest.raises(AttributeError):
        item.key = "b"  # type: ignore[misc]
    assert item == ImageInput(Path("a.jpg"), "a")


def test_plain_file_key_is_its_stem(tree: Path) -> None:
    assert _pairs(expand_inputs(["photos/b.jpg"])) == [("photos/b.jpg", "b")]


def test_explicit_file_is_taken_whatever_its_suffix(tree: Path) -> None:
    assert _pairs(expand_inputs(["photos/notes.txt"])) == [("photos/notes.txt", "notes")]


def test_folder_lists_images_directly_inside_sorted(tree: Path) -> None:
    assert _pairs(expand_inputs(["photos"])) == [
        ("photos/a.PNG", "a"),
        ("photos/b.jpg", "b"),
        ("photos/c.tiff", "c"),
    ]


def test_recursive_folder_mirrors_tree_and_skips_hidden(tree: Path) -> None:
    assert _pairs(expand_inputs(["photos"], recursive=True)) == [
        ("photos/a.PNG", "a"),
        ("photos/b.jpg", "b"),
        ("photos/c.tiff", "c"),
        ("photos/trip/day1/x.jpeg", "trip/day1/x"),
        ("photos/trip/y.webp", "trip/y"),
    ]


def test_absolute_folder_paths_stay_absolute(tree: Path) -> None:
    inputs = expand_inputs([str(tree / "other")])
    assert inputs == [ImageInput(tree / "other" / "a.bmp", "a")]


def test_glob_takes_image_files_sorted(tree: Path) -> None:
    assert _pairs(expand_inputs(["photos/*"])) == [
        ("photos/a.PNG", "a"),
        ("photos/b.jpg", "b"),
        ("photos/c.tiff", "c"),
    ]


def test_recursive_glob_keys_mirror_tree_below_fixed_prefix(tree: Path) -> None:
    assert _pairs(expand_inputs(["photos/**/*.jp*g"])) == [
        ("photos/b.jpg", "b"),
        ("photos/trip/day1/x.jpeg", "trip/day1/x"),
    ]
    assert _pairs(expand_inputs(["**/y.webp"])) == [("photos/trip/y.webp", "photos/trip/y")]


def test_glob_with_question_mark_and_brackets(tree: Path) -> None:
    assert [p.key for p in expand_inputs(["photos/[ab].*"])] == ["a", "b"]
    assert [p.key for p in expand_inputs(["photos/?.jpg"])] == ["b"]


def test_existing_path_with_glob_characters_is_literal(tree: Path) -> None:
    _touch(tree, "odd/[1].png", "odd/1.png")
    assert _pairs(expand_inputs(["odd/[1].png"])) == [("odd/[1].png", "[1]")]


def test_glob_matching_nothing_is_an_error(tree: Path) -> None:
    with pytest.raises(SlimsegError) as info:
        expand_inputs(["photos/*.gif"])
    assert str(info.value) == "photos/*.gif: no files match this pattern"


def test_glob_matching_only_non_images_is_an_error(tree: Path) -> None:
    with pytest.raises(SlimsegError, match=r"^photos/\*\.txt: .*no image files"):
        expand_inputs(["photos/*.txt"])


def test_stdin_paths(tree: Path) -> None:
    stdin = io.StringIO("# a comment\n\nphotos/b.jpg\n  other/a.bmp  \nphotos/trip\n")
    assert _pairs(expand_inputs(["-"], stdin=stdin)) == [
        ("photos/b.jpg", "b"),
        ("other/a.bmp", "a"),
        ("photos/trip/y.webp", "y"),
    ]


def test_stdin_keeps_spaces_that_are_part_of_a_file_name(tree: Path) -> None:
    (tree / " lead.jpg").write_bytes((tree / "photos" / "b.jpg").read_bytes())
    (tree / "trail.jpg ").write_bytes((tree / "photos" / "b.jpg").read_bytes())
    stdin = io.StringIO(" lead.jpg\r\ntrail.jpg \n  # an indented comment\n")
    assert _pairs(expand_inputs(["-"], stdin=stdin)) == [(" lead.jpg", " lead"), ("trail.jpg ", "trail")]


def test_stdin_lines_are_never_globs(tree: Path) -> None:
    with pytest.raises(SlimsegError, match=r"^photos/\*\.jpg: no such file or directory$"):
        expand_inputs(["-"], stdin=io.StringIO("photos/*.jpg\n"))


def test_stdin_without_paths_is_an_error(tree: Path) -> None:
    with pytest.raises(SlimsegError, match="standard input"):
        expand_inputs(["-"], stdin=io.StringIO("\n# only comments\n"))


def _binary_stdin(data: bytes) -> io.TextIOWrapper:
    """A text stream over bytes, as sys.stdin is, with the bytes reachable as ``.buffer``."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


def test_null_separated_stdin_takes_names_exactly(tree: Path) -> None:
    (tree / "new\nline.jpg").write_bytes(b"x")
    (tree / " lead.jpg").write_bytes(b"x")
    (tree / "#hash.jpg").write_bytes(b"x")
    stdin = _binary_stdin(b"new\nline.jpg\0 lead.jpg\0#hash.jpg\0photos/trip\0")
    assert _pairs(expand_inputs(["-"], stdin=stdin, null_separated=True)) == [
        ("new\nline.jpg", "new\nline"),
        (" lead.jpg", " lead"),
        ("#hash.jpg", "#hash"),
        ("photos/trip/y.webp", "y"),
    ]


def test_null_separated_stdin_keeps_undecodable_names(tree: Path) -> None:
    name = b"caf\xe9.jpg"  # Latin-1, not UTF-8: the file system's bytes come through as they are
    (tree / os.fsdecode(name)).write_bytes(b"x")
    inputs = expand_inputs(["-"], stdin=_binary_stdin(name + b"\0"), null_separated=True)
    assert [os.fsencode(image.path) for image in inputs] == [name] and inputs[0].path.exists()


def test_null_separated_stdin_also_reads_text_streams(tree: Path) -> None:
    stdin = io.StringIO("photos/b.jpg\0other/a.bmp")
    assert _pairs(expand_inputs(["-"], stdin=stdin, null_separated=True)) == [("photos/b.jpg", "b"), ("other/a.bmp", "a")]


def test_null_separated_lines_are_refused(tree: Path) -> None:
    stdin = _binary_stdin(b"photos/b.jpg\nother/a.bmp\n")
    with pytest.raises(UsageError, match="no NUL characters; give the paths with find -print0"):
        expand_inputs(["-"], stdin=stdin, null_separated=True)


def test_null_separated_needs_stdin(tree: Path) -> None:
    with pytest.raises(UsageError, match="--null applies to paths read from standard input"):
        expand_inputs(["photos/b.jpg"], null_separated=True)


def test_null_separated_without_names_is_an_error(tree: Path) -> None:
    with pytest.raises(SlimsegError, match="no image paths were read from standard input"):
        expand_inputs(["-"], stdin=_binary_stdin(b"\0\0"), null_separated=True)


def test_stdin_defaults_to_sys_stdin(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("photos/c.tiff\n"))
    assert _pairs(expand_inputs(["-"])) == [("photos/c.tiff", "c")]


def test_stdin_is_not_read_unless_asked(tree: Path) -> None:
    stdin = io.StringIO("photos/b.jpg\n")
    expand_inputs(["photos/c.tiff"], stdin=stdin)
    assert stdin.tell() == 0


def test_colliding_keys_get_numbered_suffixes_in_order(tree: Path) -> None:
    _touch(tree, "third/a.jpg", "fourth/a_2.png")
    inputs = expand_inputs(["photos/a.PNG", "other", "third/a.jpg", "fourth/a_2.png"])
    assert _pairs(inputs) == [
        ("photos/a.PNG", "a"),
        ("other/a.bmp", "a_2"),
        ("third/a.jpg", "a_3"),
        ("fourth/a_2.png", "a_2_2"),  # its natural key was already taken
    ]
    assert len({p.key for p in inputs}) == len(inputs)


def test_keys_differing_only_in_case_also_collide(tree: Path) -> None:
    _touch(tree, "upper/A.jpg")
    assert [p.key for p in expand_inputs(["photos/a.PNG", "upper/A.jpg"])] == ["a", "A_2"]


def test_same_file_given_twice_is_taken_once(tree: Path) -> None:
    inputs = expand_inputs(["photos/b.jpg", "photos", str(tree / "photos" / "b.jpg"), "photos/./b.jpg"])
    assert _pairs(inputs) == [("photos/b.jpg", "b"), ("photos/a.PNG", "a"), ("photos/c.tiff", "c")]


def test_symlink_to_same_file_is_taken_once(tree: Path) -> None:
    (tree / "link.jpg").symlink_to(tree / "photos" / "b.jpg")
    assert _pairs(expand_inputs(["photos/b.jpg", "link.jpg"])) == [("photos/b.jpg", "b")]


def test_missing_path_is_kept_to_fail_alone_when_read(tree: Path) -> None:
    """One missing file must not abort a run over the others: it stays in the list, and
    reading it reports "no such file or directory" in its turn."""
    assert _pairs(expand_inputs(["nowhere.jpg", "photos/b.jpg", "gone/x.png"])) == [
        ("nowhere.jpg", "nowhere"), ("photos/b.jpg", "b"), ("gone/x.png", "x")]
    listing = io.StringIO("photos/c.tiff\ndeleted.jpg\n")
    assert _pairs(expand_inputs(["-"], stdin=listing)) == [("photos/c.tiff", "c"), ("deleted.jpg", "deleted")]


def test_missing_path_is_an_error_when_nothing_exists(tree: Path) -> None:
    with pytest.raises(SlimsegError) as info:
        expand_inputs(["nowhere.jpg"])
    assert str(info.value) == "nowhere.jpg: no such file or directory"
    with pytest.raises(SlimsegError) as info:
        expand_inputs(["nowhere.jpg", "-", "gone.png"], stdin=io.StringIO("deleted.jpg\n"))
    assert str(info.value) == "nowhere.jpg: no such file or directory (nor does any of the other 2 inputs)"


def test_broken_symlink_is_missing(tree: Path) -> None:
    (tree / "dangling.jpg").symlink_to(tree / "gone.jpg")
    with pytest.raises(SlimsegError, match="^dangling.jpg: no such file or directory$"):
        expand_inputs(["dangling.jpg"])


def test_folder_without_images_is_an_error(tree: Path) -> None:
    (tree / "empty").mkdir()
    with pytest.raises(SlimsegError, match="^empty: no images found"):
        expand_inputs(["empty"])
    _touch(tree, "nested/deeper/p.jpg")
    with pytest.raises(SlimsegError, match="recursive"):
        expand_inputs(["nested"])
    assert _pairs(expand_inputs(["nested"], recursive=True)) == [("nested/deeper/p.jpg", "deeper/p")]


def test_no_specs_is_an_error() -> None:
    with pytest.raises(SlimsegError, match="no inputs"):
        expand_inputs([])


def test_error_messages_are_one_line(tree: Path) -> None:
    for specs in (["missing"], ["photos/*.gif"], [], ["photos/trip/day1/../../../other/none"]):
        with pytest.raises(SlimsegError) as info:
            expand_inputs(specs)
        assert "\n" not in str(info.value)
