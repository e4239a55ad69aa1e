"""``ctmask check-triton``: every problem of a Triton model repository, found without a Triton
server (layout and config: :mod:`ctmask.scale.triton_schema`)."""

from __future__ import annotations

import re
import stat
from collections import Counter
from pathlib import Path

import onnx

from ctmask.core.errors import CtmaskError, DataError, Finding
from ctmask.core.fileio import sha256_file
from ctmask.core.graphs import spec_of
from ctmask.core.spec import FORMAT as GRAPH_FORMAT
from ctmask.core.spec import UNLABELLED_FORMAT, GraphSpec
from ctmask.scale.triton_schema import (
    CONFIG,
    LABELS,
    ONNX_PLATFORM,
    PLAN_PLATFORM,
    PLATFORMS,
    TMP_PREFIX,
    contract_params,
    is_batch,
    join_dims,
    mc,
    onnx_io,
    spec_dims,
    text_format,
    version_params,
)

ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.BFLOAT16: mc.TYPE_BF16, onnx.TensorProto.DOUBLE: mc.TYPE_FP64,
    onnx.TensorProto.INT8: mc.TYPE_INT8, onnx.TensorProto.INT16: mc.TYPE_INT16,
    onnx.TensorProto.INT32: mc.TYPE_INT32, onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.UINT8: mc.TYPE_UINT8, onnx.TensorProto.UINT16: mc.TYPE_UINT16,
    onnx.TensorProto.UINT32: mc.TYPE_UINT32, onnx.TensorProto.UINT64: mc.TYPE_UINT64,
    onnx.TensorProto.BOOL: mc.TYPE_BOOL, onnx.TensorProto.STRING: mc.TYPE_STRING,
}
"""ONNX element type -> Triton data type (what onnxruntime's backend maps them to)."""




def _reason(exc: OSError) -> str:
    return f"{exc.__class__.__name__}: {exc.strerror or exc}"


def _kind(path: Path) -> tuple[str, str]:
    """What ``path`` is, symbolic links followed: ``file``, ``dir``, ``other`` (a FIFO, a device ...),
    ``missing`` or ``bad`` (a dangling or looping link, a permission error), and that in words
    (for a place where a file belongs)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        try:
            dangling = path.is_symlink()
        except OSError:
            dangling = False
        if dangling:
            return "bad", "is a symbolic link to nothing (its target does not exist)"
        return "missing", "does not exist"
    except OSError as exc:  # ELOOP (a symbolic link loop), EACCES, ENAMETOOLONG ...
        return "bad", f"cannot be resolved ({_reason(exc)})"
    if stat.S_ISREG(mode):
        return "file", "is a file"
    if stat.S_ISDIR(mode):
        return "dir", "is a directory, not a file"
    return "other", "is not a regular file (a FIFO, socket or device)"


def _outside(path: Path, repo: Path) -> str | None:
    """Where ``path`` really is when a symbolic link on its way takes it out of the model repository
    ``repo`` (None when it stays inside, or cannot be resolved: :func:`_kind` says so)."""
    try:
        real, root = path.resolve(strict=True), repo.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return None if real.is_relative_to(root) else str(real)


def _check_inside(path: Path, repo: Path, add) -> None:
    """A finding when ``path`` resolves outside ``repo``: a container mounting the repository alone
    cannot follow the link."""
    real = _outside(path, repo)
    if real is not None:
        add(f"is a symbolic link to {real}, outside the model repository: a Triton container that mounts the "
            "repository cannot read it; copy the file into the repository", path)


def _escapes(name: str) -> bool:
    """A relative file name that leaves its folder: absolute, or with a ``..`` component."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or bool(re.match(r"[A-Za-z]:", name))


def _is_path(name: str) -> bool:
    """Not a plain file name of one folder (``/``, ``\\``, ``.`` or ``..``)."""
    return "/" in name or "\\" in name or name in (".", "..")


def _read_text(path: Path, add) -> str | None:
    """``path`` read as UTF-8 text; None, with a finding naming it, when it cannot be read or is
    not UTF-8 (the finding gives the line of the first bad byte)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        add(f"unreadable ({_reason(exc)})", path)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        add(f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}: {exc.reason}); write it as "
            "UTF-8", path, data.count(b"\n", 0, exc.start) + 1)
        return None


def _entries(folder: Path) -> list[Path]:
    """``folder``'s entries, sorted (OSError when it cannot be listed)."""
    return sorted(folder.iterdir())


def model_folders(repo: Path) -> list[Path]:
    """The folders Triton would load as models (hidden folders left out; none when ``repo``
    cannot be listed)."""
    try:
        entries = _entries(Path(repo))
    except OSError:
        return []
    return [p for p in entries if not p.name.startswith(".") and _kind(p)[0] == "dir"]


def check_report(repo: Path) -> tuple[dict, list[str]]:
    """``ctmask check-triton REPO``: its JSON report (``repo``, ``models``, ``passed``,
    ``findings``) and its lines for people (the models, one line per finding, a count).

    Raises:
        DataError: as :func:`check_triton_repo`.
    """
    findings = check_triton_repo(repo)
    models = [p.name for p in model_folders(repo)]
    lines = [f"check-triton {repo}: {len(models)} model(s){': ' + ', '.join(models) if models else ''}"]
    lines += [f"  {finding}" for finding in findings]
    lines.append(f"{len(findings)} finding(s)" if findings else "no findings")
    return ({"repo": str(repo), "models": models, "passed": not findings,
             "findings": [f.to_dict() for f in findings]}, lines)


def check_triton_repo(repo: Path) -> list[Finding]:
    """Every problem of the model repository ``repo`` (empty when none).

    Each ``config.pbtxt`` is parsed into Triton's ``ModelConfig`` (a parse error names the file
    and line); a version folder must hold the file its platform loads; for ONNX models the
    config's input / output names, data types and dims must match the graph's own declared
    inputs / outputs (read with ``onnx``) and its ctmask spec, and the graph must keep no
    weights in external data files; ``max_batch_size`` >= 1 and the preferred batch sizes at
    most that; the recorded sha256 of each version's file, the labels and, for engines, the
    batch profile are checked too. Each input / output is listed once, without ``reshape``;
    ``default_model_filename`` (other than the platform's file) and ``cc_model_filenames``,
    which ctmask never writes, are findings; a ``model_warmup`` must fit ``max_batch_size`` and
    the model's inputs. A file that cannot be read, is not UTF-8 text, is a directory or a
    symbolic link loop is a finding naming it, never an exception; so is a config, labels or
    model file that a symbolic link takes outside ``repo`` (a container that mounts the
    repository cannot read it).

    Raises:
        DataError: ``repo`` is not a folder, or cannot be listed.
    """
    repo = Path(repo)
    kind, why = _kind(repo)
    if kind != "dir":
        raise DataError({"missing": "model repository does not exist",
                         "bad": f"model repository {why}"}.get(kind, "is not a folder (a Triton model repository is "
                                                                     "one)"), repo)
    try:
        entries = _entries(repo)
    except OSError as exc:
        raise DataError(f"model repository cannot be listed ({_reason(exc)})", repo) from None
    findings: list[Finding] = []
    for p in entries:
        if p.name.startswith(TMP_PREFIX):
            findings.append(Finding(path=str(p), message="left over by an interrupted ctmask write; remove it "
                                                         "(Triton would try to load it as a model)"))
    for p in entries:
        kind, why = _kind(p)
        if kind == "bad" and not p.name.startswith("."):
            findings.append(Finding(path=str(p),
                                    message=f"{why}: Triton cannot tell whether it is a model folder; remove it"))
    folders = [p for p in entries if not p.name.startswith(".") and _kind(p)[0] == "dir"]
    if not folders:
        findings.append(Finding(path=str(repo), message="holds no model folder"))
    for folder in folders:
        findings += _check_model(folder)
    return findings


def _check_model(folder: Path) -> list[Finding]:
    """Every problem of one model folder: its config, its version folders and their model files."""
    path = folder / CONFIG
    out: list[Finding] = []

    def add(message: str, where: Path = path, line: int | None = None) -> None:
        out.append(Finding(path=str(where), message=message, line=line))

    config = _read_config(folder, add)
    if config is None:
        return out
    if config.name and config.name != folder.name:
        add(f"name {config.name!r} is not the folder's name {folder.name!r} (Triton refuses the model)")
    platform = config.platform or {b: p for p, (b, _) in PLATFORMS.items()}.get(config.backend, "")
    if platform not in PLATFORMS:
        add(f"platform {config.platform!r} / backend {config.backend!r}: check-triton checks "
            f"{' and '.join(PLATFORMS)} models only")
        return out
    default_file = PLATFORMS[platform][1]
    _check_serving(config, platform, add)
    _check_io_entries(config, add)
    file_name = _check_model_files(config, default_file, add)
    _check_warmup_settings(folder, config, add)
    versions = _version_folders(folder, add)
    if not versions:
        add(f"no version folder (1/{file_name or default_file} ...)", folder)
    for v in config.version_policy.specific.versions:
        if v not in versions:
            add(f"version_policy names version {v}, which has no folder")
    recorded = version_params(config)
    for v in sorted(set(recorded) - set(versions)):
        add(f"parameters describe version {v}, which has no folder")
    label_lines = _check_labels(folder, config, add)
    for v in versions if file_name is not None else ():
        model_file = folder / str(v) / file_name
        if _check_version_file(model_file, v, platform, config, recorded, add) and platform == ONNX_PLATFORM:
            _check_onnx(model_file, config, label_lines, recorded.get(v, {}), add)
    if platform == PLAN_PLATFORM:
        _check_plan_config(config, label_lines, recorded, versions, add)
    return out


def _read_config(folder: Path, add) -> mc.ModelConfig | None:
    """The folder's ``config.pbtxt`` parsed; None, with a finding, when it is missing, not a
    file, unreadable or not a valid ``ModelConfig``."""
    path = folder / CONFIG
    kind, why = _kind(path)
    if kind == "missing":
        add(f"no {CONFIG} (ctmask writes one for every model)", folder)
        return None
    if kind != "file":
        add(why)
        return None
    _check_inside(path, folder.parent, add)
    text = _read_text(path, add)
    if text is None:
        return None
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        add(re.sub(r"^\d+:\d+ : ", "", str(exc)) + " (not a valid Triton ModelConfig)", line=exc.GetLine())
        return None


def _check_serving(config: mc.ModelConfig, platform: str, add) -> None:
    """The backend, ``max_batch_size``, preferred batch sizes and instance groups."""
    backend = PLATFORMS[platform][0]
    if config.backend and config.backend != backend:
        add(f"backend {config.backend!r} does not serve platform {platform!r} (expected {backend!r})")
    if config.max_batch_size < 1:
        add(f"max_batch_size is {config.max_batch_size}: ctmask graphs batch on their first dimension, so it must "
            "be >= 1 (and dims leave the batch out)")
    for size in config.dynamic_batching.preferred_batch_size:
        if not 1 <= size <= config.max_batch_size:
            add(f"preferred_batch_size {size} is not within 1..max_batch_size ({config.max_batch_size})")
    for group in config.instance_group:
        if group.count < 0:
            add(f"instance_group count {group.count} is negative")
        if platform == PLAN_PLATFORM and group.kind == mc.ModelInstanceGroup.KIND_CPU:
            add("instance_group KIND_CPU: a TensorRT plan runs on a GPU only")


def _version_folders(folder: Path, add) -> list[int]:
    """The version folders Triton loads, sorted; a finding for each numbered entry it ignores
    or cannot read."""
    try:
        entries = _entries(folder)
    except OSError as exc:
        add(f"cannot be listed ({_reason(exc)})", folder)
        entries = []
    versions = []
    for p in entries:
        if re.fullmatch(r"[1-9][0-9]*", p.name):
            kind, why = _kind(p)
            if kind == "dir":
                versions.append(int(p.name))
            elif kind == "bad":
                add(f"{why}: Triton cannot read it as version {p.name}", p)
            else:
                add("is a file, not a version folder: Triton ignores it", p)
        elif re.fullmatch(r"0[0-9]*", p.name) and _kind(p)[0] == "dir":
            add("a version folder starting with 0: Triton ignores it", p)
    return sorted(versions)


def _check_version_file(model_file: Path, v: int, platform: str, config: mc.ModelConfig,
                        recorded: dict[int, dict[str, str]], add) -> bool:
    """Version ``v``'s model file: present, a file inside the repository, not empty, with the
    sha256 the config records. False when it cannot be read further."""
    kind, why = _kind(model_file)
    if kind == "missing":
        add(f"version {v} has no {model_file.name} (platform {platform} loads that file)", model_file)
        return False
    if kind != "file":
        add(f"{why}: version {v}'s {model_file.name} must be the model file itself (ctmask writes one file)",
            model_file)
        return False
    _check_inside(model_file, model_file.parents[2], add)  # REPO/NAME/V/FILE: inside REPO
    sha = recorded.get(v, {}).get("sha256")
    try:
        if model_file.stat().st_size == 0:
            add("is empty", model_file)
            return False
        actual = sha256_file(model_file) if sha is not None else None
    except OSError as exc:
        add(f"unreadable ({_reason(exc)})", model_file)
        return False
    if "ctmask.format" in config.parameters and sha is None:
        add(f"records no sha256 of version {v} (ctmask.v{v}.sha256)")
    elif sha is not None and sha != actual:
        add(f"is not the file the config records (ctmask.v{v}.sha256 {sha[:12]}...): it was replaced after "
            "packaging", model_file)
    return True


def _check_io_entries(config: mc.ModelConfig, add) -> None:
    """Each input / output listed once, without a ``reshape`` (ctmask writes none)."""
    for kind, entries in (("input", config.input), ("output", config.output)):
        for name, n in sorted(Counter(e.name for e in entries).items()):
            if n > 1:
                add(f"{kind} {name!r} is listed {n} times: ctmask lists each tensor once, and only one entry can "
                    "describe it (which one Triton goes by is not defined)")
        for e in entries:
            if e.HasField("reshape"):
                shape, dims = f"[{join_dims(e.reshape.shape)}]", f"[{join_dims(e.dims)}]"
                does = (f"Triton would feed the model {shape} instead of the {dims} a client sends" if kind == "input"
                        else f"Triton would take the model's output as {shape} and return it as {dims}")
                add(f"{kind} {e.name}: reshape {shape} is not written by ctmask; {does}; remove it")


def _check_model_files(config: mc.ModelConfig, default_file: str, add) -> str | None:
    """The file Triton loads from each version folder (None: a path, not read here), with a
    finding for ``default_model_filename`` / ``cc_model_filenames`` (ctmask writes neither)."""
    name = config.default_model_filename
    file_name: str | None = default_file
    if name and name != default_file:
        if _is_path(name):
            add(f"default_model_filename {name!r} is not written by ctmask, and is a path, not a file name of the "
                f"version folder: Triton would load N/{name} (outside the version folder) instead of "
                f"N/{default_file}; remove it")
            file_name = None
        else:
            add(f"default_model_filename {name!r} is not written by ctmask; Triton would load {name} from each "
                f"version folder instead of {default_file}; remove it")
            file_name = name
    for cc, cc_file in sorted(config.cc_model_filenames.items()):
        where = " (a path, outside the version folder)" if _is_path(cc_file) else ""
        add(f"cc_model_filenames {cc!r}: {cc_file!r} is not written by ctmask; Triton would load {cc_file}{where} "
            f"instead of {file_name or name} on GPUs of compute capability {cc}; remove it")
    return file_name


def _check_warmup_settings(folder: Path, config: mc.ModelConfig, add) -> None:
    """Each ``model_warmup``'s batch size within ``max_batch_size`` and its data files present
    (its inputs are checked against the model's in :func:`_check_warmup_inputs`)."""
    for w in config.model_warmup:
        if not 1 <= w.batch_size <= max(config.max_batch_size, 1):
            add(f"model_warmup {w.name!r}: batch_size {w.batch_size} is not within 1..max_batch_size "
                f"({config.max_batch_size}); Triton refuses to load the model")
        for name, value in sorted(w.inputs.items()):
            data = value.input_data_file
            if not data:
                continue
            if _escapes(data):
                add(f"model_warmup {w.name!r} input {name}: input_data_file {data!r} points outside the model's "
                    "warmup/ folder")
                continue
            kind, why = _kind(folder / "warmup" / data)
            if kind != "file":
                add(f"{why}: model_warmup {w.name!r} input {name} reads it (input_data_file, in the model's warmup/ "
                    "folder)", folder / "warmup" / data)


def _check_warmup_inputs(config: mc.ModelConfig, expected: dict[str, tuple[int | None, list[int] | None]],
                         what: str, add) -> None:
    """Each ``model_warmup`` gives every input of ``expected`` (name -> Triton data type, dims
    after the batch, -1 for any size; None: unknown) and nothing else, of its type and dims."""
    for w in config.model_warmup:
        head = f"model_warmup {w.name!r}"
        for name in sorted(set(expected) - set(w.inputs)):
            add(f"{head} gives no data for input {name!r} of {what} (Triton warms a model up with all its inputs)")
        for name, value in sorted(w.inputs.items()):
            if name not in expected:
                add(f"{head} names input {name!r}, which is not an input of {what} ({sorted(expected)})")
                continue
            want_type, want_dims = expected[name]
            if want_type is not None and value.data_type != want_type:
                add(f"{head} input {name}: data_type {mc.DataType.Name(value.data_type)}, {what} takes "
                    f"{mc.DataType.Name(want_type)}")
            got = list(value.dims)
            if want_dims is not None and (len(got) != len(want_dims) or any(
                    g < 1 or (w_ >= 0 and g != w_) for g, w_ in zip(got, want_dims))):
                add(f"{head} input {name}: dims [{join_dims(got)}], {what} takes [{join_dims(want_dims)}]"
                    + (" after the batch" if config.max_batch_size >= 1 else "")
                    + (" (-1: any size >= 1)" if -1 in want_dims else ""))


def _check_labels(folder: Path, config: mc.ModelConfig, add) -> list[str] | None:
    """The class names of the output carrying a label file (None if none does, or it cannot be read)."""
    names = None
    for o in config.output:
        if not o.label_filename:
            continue
        if _escapes(o.label_filename):
            add(f"output {o.name}'s label_filename {o.label_filename!r} points outside the model folder (ctmask "
                f"writes {LABELS} next to {CONFIG}); not read")
            continue
        path = folder / o.label_filename
        kind, why = _kind(path)
        if kind == "missing":
            add(f"output {o.name}'s label_filename {o.label_filename!r} does not exist", path)
            continue
        if kind != "file":
            add(f"{why}: output {o.name}'s label_filename must be a text file of class names", path)
            continue
        _check_inside(path, folder.parent, add)
        text = _read_text(path, add)
        if text is None:
            continue
        names = [line for line in text.splitlines() if line]
        if o.dims and o.dims[-1] > 0 and len(names) != o.dims[-1]:
            add(f"holds {len(names)} labels for output {o.name} of {o.dims[-1]} classes", path)
    return names


def _config_io(config: mc.ModelConfig):
    return {i.name: i for i in config.input}, {o.name: o for o in config.output}


def _tensors(graph: onnx.GraphProto):
    """Every tensor of ``graph``: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _check_external_data(proto: onnx.ModelProto, model_file: Path, add) -> None:
    """A finding per external data file the graph's tensors point to, and whether it is there."""
    from onnx.external_data_helper import uses_external_data

    files: dict[str, list[str]] = {}
    for tensor in _tensors(proto.graph):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            files.setdefault(location, []).append(tensor.name)
    for location, names in sorted(files.items()):
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        if not location:
            state = "no location is given"
        elif _escapes(location):
            state = "it lies outside the version folder"
        else:
            kind, why = _kind(model_file.parent / location)
            state = {"file": "the data file is present in the version folder",
                     "missing": "the data file is missing from the version folder"}.get(kind, f"the data file {why}")
        add(f"keeps the weights of {len(names)} initializer(s) ({listed}) in the external data file {location!r} "
            f"({state}): ctmask export writes one self-contained file and refuses such graphs, and Triton's copy of "
            f"{model_file.name} may lack the data file; re-export it as one file", model_file)


def _check_onnx(model_file: Path, config: mc.ModelConfig, label_lines: list[str] | None, meta: dict[str, str],
                add) -> None:
    """Config vs the ONNX file's own inputs / outputs, then vs its ctmask spec."""
    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError ...
        add(f"not a loadable ONNX model ({exc.__class__.__name__})", model_file)
        return
    _check_external_data(proto, model_file, add)
    graph_io = onnx_io(proto)
    batched = config.max_batch_size >= 1
    warmup: dict[str, tuple[int | None, list[int] | None]] = {}
    for kind, entries, declared in zip(("input", "output"), _config_io(config), graph_io):
        if kind == "input":
            warmup = {n: (ONNX_TO_TRITON.get(elem), None if dims is None else
                          [-1 if is_batch(d) else int(d) for d in (dims[1:] if batched else dims)])
                      for n, (elem, dims) in declared.items()}
        for name in sorted(set(entries) - set(declared)):
            add(f"config {kind} {name!r} is not a graph {kind} of {model_file} (graph: {sorted(declared)})")
        for name in sorted(set(declared) - set(entries)):
            add(f"graph {kind} {name!r} of {model_file} is missing from the config")
        for name in sorted(set(entries) & set(declared)):
            entry, (elem, dims) = entries[name], declared[name]
            want_type = ONNX_TO_TRITON.get(elem)
            if entry.data_type != want_type:
                got = mc.DataType.Name(entry.data_type)
                want = mc.DataType.Name(want_type) if want_type is not None else f"ONNX type {elem}"
                add(f"{kind} {name}: data_type {got}, the graph's is {want}")
            if dims is None:
                add(f"graph {kind} {name} declares no shape: its config dims cannot be checked", model_file)
                continue
            if batched:
                if not dims or not is_batch(dims[0]):
                    add(f"graph {kind} {name} has a fixed first dimension {dims[:1]}, but max_batch_size > 0 "
                        "makes it the batch", model_file)
                dims = dims[1:]
            want_dims = [-1 if is_batch(d) else d for d in dims]
            if list(entry.dims) != want_dims:
                add(f"{kind} {name}: dims [{join_dims(entry.dims)}], the graph declares [{join_dims(want_dims)}]"
                    + (" after the batch" if batched else ""))
    _check_warmup_inputs(config, warmup, f"the graph {model_file}", add)
    try:
        spec = spec_of(proto, model_file, check_shapes=False)
    except CtmaskError as exc:
        add(f"not a ctmask graph: {exc.message}", model_file)
        return
    _check_against_spec(config, spec, label_lines, add, str(model_file))
    if meta.get("precision", spec.precision) != spec.precision:
        add(f"records precision {meta['precision']!r}, the graph declares {spec.precision!r}")


def _check_against_spec(config: mc.ModelConfig, spec: GraphSpec, label_lines: list[str] | None, add,
                        what: str, check_params: bool = True) -> None:
    want_in, want_out = spec_dims(spec)
    for kind, entries, want in zip(("input", "output"), _config_io(config), (want_in, want_out)):
        if set(entries) != set(want):
            add(f"config {kind}s are {sorted(entries)}, the ctmask contract of {what} names {sorted(want)}")
        for name in sorted(set(entries) & set(want)):
            if entries[name].data_type != mc.TYPE_FP32:
                add(f"{kind} {name}: data_type {mc.DataType.Name(entries[name].data_type)}, the ctmask contract "
                    "is TYPE_FP32")
            if list(entries[name].dims) != want[name]:
                add(f"{kind} {name}: dims [{join_dims(entries[name].dims)}], the ctmask spec of {what} says "
                    f"[{join_dims(want[name])}] after the batch")
    if label_lines is None:
        if not any(o.label_filename for o in config.output):  # else its problem is a finding already
            add(f"no output carries a label_filename (ctmask attaches {LABELS} to probs)")
    elif label_lines != list(spec.class_names):
        add(f"labels {label_lines} are not the class names {list(spec.class_names)} of {what}")
    if check_params:
        for key, value in contract_params(spec).items():
            if key in config.parameters and config.parameters[key].string_value != value:
                add(f"parameter {key} is {config.parameters[key].string_value!r}, {what} says {value!r}")


def _check_plan_config(config: mc.ModelConfig, label_lines: list[str] | None, recorded: dict[int, dict[str, str]],
                       versions: list[int], add) -> None:
    """A plan cannot be read here: its config is checked against the ctmask contract its
    parameters record (input size, N; the classes of its labels) and each version's batch profile."""
    params = {k: v.string_value for k, v in config.parameters.items()}
    fmt = params.get("ctmask.format")
    if fmt not in (GRAPH_FORMAT, UNLABELLED_FORMAT):  # an engine of an unlabelled graph: no labels output
        add(f"parameter ctmask.format is {fmt!r}, this ctmask writes {GRAPH_FORMAT!r} (and reads "
            f"{UNLABELLED_FORMAT!r})")
    try:
        spec = GraphSpec(preset=params["ctmask.preset"], image_size=int(params["ctmask.input_size"]),
                         n_rois=int(params["ctmask.n_rois"]), labels=fmt != UNLABELLED_FORMAT,
                         **({"class_names": tuple(label_lines)} if label_lines else {}))
    except (KeyError, ValueError) as exc:
        add(f"tensorrt_plan config without a readable ctmask contract in its parameters ({exc.__class__.__name__}: "
            f"{exc}): its inputs and outputs cannot be checked")
    else:
        _check_against_spec(config, spec, label_lines, add, "its ctmask parameters", check_params=False)
    _check_warmup_inputs(config, {i.name: (i.data_type, list(i.dims)) for i in config.input}, "the config", add)
    for v in versions:
        profile = recorded.get(v, {}).get("profile")
        if profile is None:
            add(f"records no batch profile of version {v} (ctmask.v{v}.profile)")
            continue
        try:
            lo, _, hi = (int(x) for x in profile.split(","))
        except ValueError:
            add(f"ctmask.v{v}.profile {profile!r} is not MIN,OPT,MAX")
            continue
        if config.max_batch_size > hi:
            add(f"max_batch_size {config.max_batch_size} is above version {v}'s batch profile MAX {hi}: TensorRT "
                "refuses such batches")
        if lo > 1:
            add(f"version {v}'s batch profile starts at {lo}: Triton sends batches from 1 up")
