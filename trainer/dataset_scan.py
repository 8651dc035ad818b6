"""Reading one dataset subset from disk, with kohya's rules (``library/train_util.py``).

DreamBooth subsets list the images directly inside ``image_dir`` (not recursive) and take
each caption from ``<image stem><caption_extension>``; fine-tuning subsets read a metadata
file. Problems that stop training go to ``problems``; surprises that kohya accepts silently
(or only logs) go to ``notes``, which become ``DatasetPlan.warnings``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

# kohya lists these (plus .avif/.jxl when optional plugins are installed). kohya spells out
# the lower- and upper-case forms only; we match any case (``a.Jpg`` too).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Image formats a user may expect to work; named in the "no images" warning.
_OTHER_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".jxl", ".heic")
# The two caption extensions in common use: one present while the other is configured is
# kohya's classic silent trap (its default is ".caption", most taggers write ".txt").
_CAPTION_EXTENSIONS = (".txt", ".caption")
_SHOW = 5  # file names listed in one message


@dataclass(frozen=True)
class Found:
    path: str  # absolute image path
    caption: str
    size: tuple[int, int] | None = None


def _names(paths: list[str]) -> str:
    shown = ", ".join(os.path.basename(p) for p in paths[:_SHOW])
    return shown + (f" and {len(paths) - _SHOW} more" if len(paths) > _SHOW else "")


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str) -> list[str]:
    """Image files directly in ``folder``, sorted by path (kohya's order)."""
    with os.scandir(folder) as it:
        paths = [e.path for e in it if e.is_file() and is_image(e.name)]
    return sorted(os.path.abspath(p) for p in paths)


@dataclass(frozen=True)
class ConceptFolder:
    """A sub-folder read as kohya reads ``--train_data_dir``: ``10_sks dog`` → 10 repeats,
    class tokens "sks dog"."""

    path: str
    name: str
    repeats: int | None  # None: the name does not start with an integer and "_"
    class_tokens: str
    images: int


def concept_params(name: str) -> tuple[int, str] | None:
    """kohya's reading of a folder name: the text before the first "_" is the repeat count
    (Python's ``int``, as kohya), the rest, underscores kept, the class tokens ("10" → (10, ""));
    None when the first part is not an integer."""
    head, _, rest = name.partition("_")
    try:
        return int(head), rest
    except ValueError:
        return None


def concept_folders(parent: str) -> list[ConceptFolder]:
    """The sub-folders of ``parent`` in name order (kohya takes the file system's order, which
    differs between machines), each with its kohya reading and image count."""
    out = []
    with os.scandir(parent) as it:
        dirs = sorted((e.name, e.path) for e in it if e.is_dir())
    for name, path in dirs:
        params = concept_params(name)
        try:
            count = len(list_images(path))
        except OSError:
            count = 0
        repeats, tokens = params if params else (None, "")
        out.append(ConceptFolder(os.path.abspath(path), name, repeats, tokens, count))
    return out


def toml_str(text: str) -> str:
    """A TOML string for a message the user may paste (a literal string keeps backslashes)."""
    return f"'{text}'" if "'" not in text and "\n" not in text else json.dumps(text)


def _explain_concept_parent(src: str, folder: str, is_reg: bool) -> str | None:
    """The problem when ``image_dir`` names a parent of kohya ``<repeats>_<class tokens>``
    folders: what was found and what to write instead; None when it is not one."""
    found = [c for c in concept_folders(folder) if c.repeats is not None and c.images]
    if not found:
        return None
    listed = ", ".join(f"{c.name!r} ({c.images} images: num_repeats {c.repeats}, class_tokens {c.class_tokens!r})"
                       for c in found[:_SHOW])
    more = f" and {len(found) - _SHOW} more" if len(found) > _SHOW else ""
    first = found[0]
    key = "reg_data_dir" if is_reg else "train_data_dir"
    return (
        f"{src}.image_dir: {folder} holds no images itself but kohya concept folders {listed}{more}; kohya reads"
        f" such folders only through --{key}. Write {key} = {toml_str(folder)} at the top of the training config"
        f" in place of the [[datasets]] tables, or give each folder its own [[datasets.subsets]] entry"
        f" (image_dir = {toml_str(first.path)}, num_repeats = {first.repeats},"
        f" class_tokens = {toml_str(first.class_tokens)}{', is_reg = true' if is_reg else ''})"
    )


def _explain_empty(folder: str) -> str:
    """Why a folder that exists may hold no usable images."""
    others, nested = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file() and os.path.splitext(e.name)[1].lower() in _OTHER_IMAGE_EXTENSIONS:
                others.append(e.name)
            elif e.is_dir():
                try:
                    if any(is_image(n) for n in os.listdir(e.path)):
                        nested.append(e.name)
                except OSError:
                    pass
    why = ""
    if others:
        why += f"; unsupported formats found ({_names(sorted(others))}); use png, jpg, jpeg, webp or bmp"
    if nested:
        why += (
            f"; its sub-folders ({', '.join(sorted(nested)[:_SHOW])}) hold images, but image_dir must be"
            " the folder that directly contains them (kohya's '<repeats>_<class tokens>' sub-folder layout"
            " is read through train_data_dir, a top-level key of the training config)"
        )
    return why


def _caption_candidates(image_path: str, ext: str) -> list[str]:
    base = os.path.splitext(image_path)[0]
    paths = [base + ext]
    # kohya also tries the name without the last four "_"-separated parts: face-crop
    # augmented copies ("img_1_2_3_4.png") share the caption of "img".
    parts = base.split("_")
    if len(parts) >= 5:
        paths.append("_".join(parts[:-4]) + ext)
    return paths


def read_caption(image_path: str, ext: str, problems: list[str], boms: list[str] | None = None) -> str | None:
    """The caption for an image (first line, stripped) or None if it has no caption file.
    A caption file that starts with a UTF-8 byte-order mark is added to ``boms``."""
    for cap in _caption_candidates(image_path, ext):
        if not os.path.isfile(cap):
            continue
        try:
            with open(cap, encoding="utf-8") as f:
                lines = f.readlines()
        except UnicodeDecodeError:
            problems.append(f"caption file is not UTF-8: {cap}")
            return ""
        if not lines:  # kohya asserts here too
            problems.append(f"caption file is empty: {cap}")
            return ""
        first = lines[0]
        if first.startswith("\ufeff"):  # a BOM (Windows editors): read as plain UTF-8 it joins the first tag
            first = first[1:]
            if boms is not None:
                boms.append(cap)
        return first.strip()
    return None


def scan_dreambooth(src: str, opts: dict, problems: list[str], notes: list[str]) -> list[Found]:
    folder = opts["image_dir"]
    if not os.path.isdir(folder):
        # kohya only warns and skips; a missing folder is nearly always a typo, so stop here.
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        problems.append(f"{src}.image_dir: {folder} {what}")
        return []
    images = list_images(folder)
    if not images:
        parent = _explain_concept_parent(src, folder, bool(opts.get("is_reg")))
        if parent:  # kohya would skip the subset; nearly always a misplaced train_data_dir
            problems.append(parent)
            return []
        notes.append(f"{src}: no images in {folder}, so kohya ignores this subset{_explain_empty(folder)}")
        return []

    ext = opts["caption_extension"]
    if ext and not ext.startswith("."):
        ext = "." + ext  # kohya adds the dot ("txt" means ".txt")
    class_tokens = opts["class_tokens"]
    found, missing, blank, boms = [], [], [], []
    for path in images:
        caption = read_caption(path, ext, problems, boms)
        if caption is None:
            missing.append(path)
            caption = class_tokens if class_tokens is not None else ""
        elif caption == "":
            blank.append(path)
        found.append(Found(path, caption))

    if missing:
        other_ext = [e for e in _CAPTION_EXTENSIONS if e != ext]
        ignored = [p for p in missing if any(os.path.isfile(os.path.splitext(p)[0] + e) for e in other_ext)]
        if ignored:
            present = "/".join(e for e in other_ext if any(os.path.isfile(os.path.splitext(p)[0] + e) for p in ignored))
            default = " (kohya's default)" if ext == ".caption" else ""
            instead = f"class_tokens {class_tokens!r}" if class_tokens is not None else "an empty caption"
            notes.append(
                f"{src}: {len(ignored)} of {len(images)} images have a {present} caption file that is ignored because"
                f" caption_extension is {ext!r}{default}; they train with {instead} instead."
                f" Set caption_extension = {present.split('/')[0]!r} to use them ({_names(ignored)})"
            )
        rest = [p for p in missing if p not in set(ignored)]
        if rest and class_tokens is None:
            notes.append(
                f"{src}: {len(rest)} of {len(images)} images have no {ext} file and the subset has no"
                f" class_tokens; they train with an empty caption, as kohya does ({_names(rest)})"
            )
        elif rest and len(rest) < len(images):
            notes.append(
                f"{src}: {len(rest)} of {len(images)} images have no {ext} file and use class_tokens"
                f" {class_tokens!r} ({_names(rest)})"
            )
    if boms:
        notes.append(f"{src}: {len(boms)} caption files start with a UTF-8 byte-order mark (BOM), which was"
                     f" removed; read as plain UTF-8 it would become part of the first tag ({_names(boms)})")
    if blank:
        notes.append(
            f"{src}: {len(blank)} caption files are blank; kohya trains those images with an empty caption,"
            f" not with class_tokens ({_names(blank)})"
        )
    return found


# ----------------------------------------------------------------------------- fine-tuning


def _read_metadata(path: str, src: str, problems: list[str], notes: list[str]) -> dict | None:
    """kohya's metadata: JSON ``{image_key: {caption, tags, image_size}}`` or JSONL, one
    ``{"image_path", "caption", "tags", "image_size"}`` object per line (only
    ``image_path`` is required). A key listed twice keeps its last entry, as in kohya, which
    says nothing; here a warning names each such key."""
    if not os.path.isfile(path):
        problems.append(f"{src}.metadata_file: {path} does not exist")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{src}.metadata_file: cannot read {path}: {e}")
        return None
    repeated: dict[str, list[str]] = {}  # key → where each of its entries is (line numbers for JSONL)
    if not path.lower().endswith(".jsonl"):
        objects: list[list[str]] = []  # per JSON object, its keys in order; the outermost comes last

        def keep_pairs(pairs):
            objects.append([k for k, _ in pairs])
            return dict(pairs)  # the last value of a repeated key wins, as json.load does

        try:
            data = json.loads(text, object_pairs_hook=keep_pairs)
        except json.JSONDecodeError as e:
            problems.append(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}")
            return None
        if not isinstance(data, dict):
            problems.append(f"{path}: expected a JSON object {{image_key: {{\"caption\": ...}}}}")
            return None
        for key in objects[-1]:
            repeated.setdefault(key, []).append("")
    else:
        data = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue  # kohya fails on blank lines; a trailing one is common, so skip them
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}: line {n}, column {e.colno}: invalid JSON: {e.msg}")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("image_path"), str):
                problems.append(f"{path}: line {n}: expected an object with an \"image_path\" string")
                continue
            data[row["image_path"]] = {k: row[k] for k in ("caption", "tags", "image_size") if k in row}
            repeated.setdefault(row["image_path"], []).append(str(n))
    twice = {k: lines for k, lines in repeated.items() if len(lines) > 1}
    if twice:
        where = ", ".join(f"{k!r} {len(v)} times" + (f" (lines {', '.join(v)})" if v[0] else "")
                          for k, v in list(twice.items())[:_SHOW])
        more = f" and {len(twice) - _SHOW} more" if len(twice) > _SHOW else ""
        notes.append(f"{path}: {len(twice)} image keys are listed more than once ({where}{more}); each is trained"
                     " once with its last entry's caption, tags and size, the earlier entries are ignored (kohya"
                     " does the same without a warning)")
    return data


def _locate(key: str, image_dir: str | None) -> str | None:
    """The image file for a metadata key, or None. kohya's own metadata scripts write the
    image *stem* as key unless ``--full_path``; kohya only finds such images through latent
    caches, so try the image extensions as older kohya versions did."""
    path = key if os.path.isabs(key) else os.path.join(image_dir or "", key)
    if os.path.isfile(path):
        return os.path.abspath(path)
    if not is_image(path):
        folder, stem = os.path.split(path)
        try:
            hits = [n for n in os.listdir(folder or ".") if os.path.splitext(n)[0] == stem and is_image(n)]
        except OSError:
            hits = []
        if len(hits) == 1:
            return os.path.abspath(os.path.join(folder, hits[0]))
    return None


def scan_finetuning(src: str, opts: dict, problems: list[str], notes: list[str]) -> list[Found]:
    md_path, image_dir = opts["metadata_file"], opts["image_dir"]
    if image_dir is not None and not os.path.isdir(image_dir):
        problems.append(f"{src}.image_dir: {image_dir} does not exist")
        return []
    metadata = _read_metadata(md_path, src, problems, notes)
    if metadata is None:
        return []
    if not metadata:
        notes.append(f"{src}: {md_path} lists no images, so kohya ignores this subset")
        return []

    sep = opts["caption_separator"]
    found, missing, relative, bad = [], [], [], []
    spellings: dict[str, list[str]] = {}  # image file → the keys that name it
    for key, md in metadata.items():
        if not os.path.isabs(key) and image_dir is None:
            relative.append(key)
            continue
        if not isinstance(md, dict):
            bad.append(f"{key!r}: expected an object, got {type(md).__name__}")
            continue
        caption, tags, size = md.get("caption"), md.get("tags"), md.get("image_size")
        if caption is None:
            caption = ""
        if not isinstance(caption, str) or (tags is not None and not isinstance(tags, str)):
            bad.append(f"{key!r}: caption and tags must be strings")
            continue
        if size is not None:
            ok = isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)
            if not ok:
                bad.append(f"{key!r}: image_size must be [width, height], got {size!r}")
                continue
            size = (size[0], size[1])
        if tags:  # kohya appends the tags after the caption with the caption separator
            caption = f"{caption}{sep}{tags}" if caption else tags
        path = _locate(key, image_dir)
        if path is None:
            missing.append(key)
            continue
        found.append(Found(path, caption, size))
        spellings.setdefault(path, []).append(key)

    if relative:
        problems.append(
            f"{src}: {len(relative)} keys in {os.path.basename(md_path)} are relative paths"
            f" ({_names(relative)}), so the subset needs image_dir"
        )
    for b in bad[:_SHOW]:
        problems.append(f"{md_path}: {b}")
    if len(bad) > _SHOW:
        problems.append(f"{md_path}: ... and {len(bad) - _SHOW} more bad entries")
    same = {p: keys for p, keys in spellings.items() if len(keys) > 1}
    if same:
        # kohya keys its images by the metadata key, so two spellings of one file are two images.
        last = {f.path: i for i, f in enumerate(found)}
        found = [f for i, f in enumerate(found) if last[f.path] == i]
        shown = "; ".join(" and ".join(repr(k) for k in keys) for keys in list(same.values())[:_SHOW])
        notes.append(f"{src}: {len(same)} images are named by more than one key in {os.path.basename(md_path)}"
                     f" ({shown}); each is trained once with its last entry; kohya would train it once per key")
    if missing:
        where = f" in {image_dir}" if image_dir else ""
        problems.append(
            f"{src}: {len(missing)} of {len(metadata)} images listed in {os.path.basename(md_path)} were not"
            f" found{where}: {_names(missing)}"
        )
    return found
