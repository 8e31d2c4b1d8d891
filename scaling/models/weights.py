"""Weight sources: every source becomes a local file, every file becomes a timm state dict, one loader.

    source string ──resolve_source──▶ WeightSpec ──fetch──▶ local file ──read_state_dict──▶ state dict
                                                                         ──load_into──▶ backbone

* ``scratch``: nothing is loaded.
* ``hub`` / ``hub:<tag>`` / a named hub source (``bit-m``, ``in21k``): the timm checkpoint on the Hugging
  Face hub (``timm/<arch.tag>``), read from the HF cache first; downloaded only when the hub is reachable.
* a named URL source (``bit-s``): the official BiT ``.npz``, downloaded once into the weights directory.
* ``<source>:<path>`` or a plain path: a local ``.safetensors``, ``.pt``/``.pth``/``.bin``
  (``torch.load(weights_only=True)``) or BiT ``.npz`` file.
* ``<label>:<path>`` with a label of your own (``mimic:/weights/mimic``): the same file or directory, named
  ``<label>`` in tables, plots and W&B instead of by its path (:data:`LABEL`).
* ``meanvar:<source>`` (any source above but ``scratch``): that source's weights, each tensor then replaced by i.i.d.
  normal draws with its own mean and variance (Raghu et al. 2019's Mean Var init,
  :func:`scaling.models.reinit.mean_var_init`), seeded by the run.
* ``<source>:<directory>`` or a plain directory: one file per backbone, so one grid source serves every backbone
  of a grid (e.g. ``bit-l:/weights/jft`` holding ``BiT-L-R50x1.npz``, ``BiT-L-R101x3.npz``...). The file is found
  by :func:`file_candidates`: the official BiT name of that source, then ``<preset>.<ext>`` and
  ``<timm name>.<ext>`` (what ``recipes/pretrain.py --out <dir>/<preset>.safetensors`` and the study's upstream
  runs write).

Offline (``HF_HUB_OFFLINE=1``, ``SCALING_OFFLINE=1`` or an unreachable host) a missing file fails within
seconds with the instruction to provide it: huggingface_hub otherwise retries a failing DNS lookup for ~46 s
(measured with huggingface_hub 2.4 and no DNS). Before any network access the weights directory
(``$SCALING_WEIGHTS_DIR``, default ``~/.cache/scaling/weights``) is searched for ``<arch.tag>.<ext>`` (hub
sources) or the URL's file name (``BiT-S-R50x1.npz``), so copying a file there is the offline override that
needs no config change.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch

from scaling.config import MEAN_VAR_PREFIX, mean_var_source
from scaling.models.presets import Preset, Source, hf_location, is_hf

FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")
LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]*")
"""What may name a user's weight file or directory in ``<label>:<path>``: a letter, then letters, digits and
``_ . + -``. ``hub``, ``hf``, ``upstream`` and ``meanvar`` are taken."""
RESERVED_LABELS = ("hub", "hf", "upstream", "meanvar", "scratch", "none")
PROBE_TIMEOUT_S = 3.0
"""Seconds allowed to resolve and connect to a weight host before declaring it unreachable."""


class WeightsUnavailable(RuntimeError):
    """Requested weights are neither on disk nor downloadable; the message says how to provide them."""


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the backbone; the message names the first offending tensor."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """A resolved weight source."""

    kind: str
    """``scratch``, ``hub``, ``url``, ``file`` or ``hf`` (a Hugging Face checkpoint, :mod:`scaling.models.hf`)."""
    location: str = ""
    """timm ``arch.tag`` (hub), URL (url), path (file) or Hugging Face repo / directory (hf, and scratch of an
    ``hf:`` backbone, whose architecture comes from there)."""
    source: Source | None = None
    """The preset's source metadata (dataset, size) when known."""
    name: str = ""
    """The user's label of a file source (``mimic`` of ``mimic:/weights/mimic``), or ""."""
    mean_var: bool = False
    """Load these weights, then replace each tensor by i.i.d. draws with its mean and variance (``meanvar:<source>``,
    :func:`scaling.models.reinit.mean_var_init`)."""

    @property
    def label(self) -> str:
        """Short description for logs and run metadata."""
        name = self.source.name if self.source else self.name or self.kind
        text = name if self.kind == "scratch" else f"{name} ({self.location})"
        return MEAN_VAR_PREFIX + text if self.mean_var else text


def weights_dir() -> Path:
    """Directory searched for local weight files before any download (``$SCALING_WEIGHTS_DIR``)."""
    return Path(os.environ.get("SCALING_WEIGHTS_DIR", Path.home() / ".cache" / "scaling" / "weights")).expanduser()


def _is_path(text: str) -> bool:
    return text.lower().endswith(FILE_SUFFIXES) or "/" in text or os.sep in text or Path(text).exists()


def is_scratch(pretrained: str) -> bool:
    """Whether ``model.pretrained`` loads nothing (``scratch``, ``none`` or empty): the backbone is the seed's own
    random initialisation."""
    return pretrained.strip().lower() in ("", "scratch", "none")


def resolve_source(preset: Preset, pretrained: str) -> WeightSpec:
    """Parse ``model.pretrained`` for ``preset`` into a :class:`WeightSpec` (no I/O besides path checks).

    Raises ValueError listing the valid sources when ``pretrained`` names none of them.
    """
    text = pretrained.strip()
    low = text.lower()
    inner = mean_var_source(text)
    if inner is not None:
        if is_scratch(inner) or mean_var_source(inner) is not None:
            raise ValueError(f"pretrained={text!r}: a Mean Var init draws with the statistics of pretrained weights; "
                             f"name their source after 'meanvar:' (e.g. 'meanvar:bit-m'), not {inner!r}")
        return dataclasses.replace(resolve_source(preset, inner), mean_var=True)
    if preset.family == "hf":
        if is_scratch(text):
            return WeightSpec("scratch", hf_location(preset.name))
        if low in ("hf", "hub") or (is_hf(text) and hf_location(text) == hf_location(preset.name)):
            return WeightSpec("hf", hf_location(preset.name))
        raise ValueError(f"backbone {preset.name!r} takes pretrained 'hf' (its own weights) or 'scratch', not {text!r}")
    if is_hf(text):
        raise ValueError(f"pretrained={text!r} is a Hugging Face model, which brings its own architecture: set "
                         f"model.backbone to {text!r} and model.pretrained to 'hf' (backbone {preset.name!r} is timm's)")
    if is_scratch(text):
        return WeightSpec("scratch")
    if low.startswith("upstream:"):
        raise ValueError(
            f"pretrained={text!r} names a demo upstream run; the study runner replaces it with the file written by "
            "recipes/pretrain.py before building the model. Outside a study pass that file's path instead."
        )
    if low == "hub":
        if not preset.default_hub:
            raise ValueError(f"backbone {preset.name!r} has no hub weights; use 'hub:<timm tag>' or a local file")
        return _spec_for(preset.source(preset.default_hub))
    if low.startswith("hub:"):
        return WeightSpec("hub", _hub_name(preset, text[4:].strip()))
    if not _is_path(text) and ":" not in text:
        return _spec_for(preset.source(text))
    name, sep, rest = text.partition(":")
    if sep and not Path(text).exists() and (name.lower() in preset.sources or name.lower() in preset.aliases):
        # ``bit-l:/data/jft_r50x1.npz``: a local file standing in for a named source (keeps its metadata);
        # ``bit-l:/data/jft/``: a directory with one such file per backbone.
        source = preset.source(name)
        return WeightSpec("file", _existing(rest, preset, source, text), source)
    if sep and LABEL.fullmatch(name) and name.lower() not in RESERVED_LABELS and _is_path(rest) \
            and not Path(text).exists():
        # ``mimic:/weights/mimic``: the user's own file or directory under a label of their choosing (no metadata:
        # the label is not a source this preset knows, so its pretraining set and size are unknown).
        return WeightSpec("file", _existing(rest, preset, None, text), None, name)
    if _is_path(text):
        return WeightSpec("file", _existing(text, preset))
    valid = sorted(["scratch", "hub", "hub:<timm tag>", "<path>", "<label>:<path>", *preset.sources,
                    *preset.aliases])
    raise ValueError(f"unknown weight source {text!r} for backbone {preset.name!r}; valid: {valid}")


def _spec_for(source: Source) -> WeightSpec:
    if source.user_file:
        raise ValueError(
            f"source {source.name!r} ({source.dataset}) was never released; supply the checkpoint as "
            f"'{source.name}:/path/to/checkpoint.npz' (or .safetensors/.pt)"
        )
    if source.hub:
        return WeightSpec("hub", source.hub, source)
    return WeightSpec("url", source.url, source)


def _hub_name(preset: Preset, tag: str) -> str:
    import timm

    name = tag if "." in tag else f"{preset.timm_name}.{tag}"
    if name not in timm.list_pretrained(name):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{preset.timm_name}.*")]
        raise ValueError(f"timm has no pretrained weights {name!r}; tags for {preset.timm_name}: {tags}")
    return name


_BIT_LETTER = {"bit-s": "S", "bit-m": "M", "bit-l": "L"}


def file_candidates(preset: Preset, source: Source | None = None) -> list[str]:
    """File names a weight directory is searched for, in order, for ``preset`` (and the named ``source``).

    The official BiT name (``BiT-L-R50x1.npz``; big_transfer's naming) when the preset is a BiT model and the
    source one of ``bit-s/m/l``; then ``<preset name>`` and ``<timm name>`` with each of :data:`FILE_SUFFIXES`.
    """
    names = []
    if preset.bit_arch and source is not None and source.name in _BIT_LETTER:
        names.append(f"BiT-{_BIT_LETTER[source.name]}-{preset.bit_arch}.npz")
    for stem in dict.fromkeys([preset.name, preset.timm_name]):
        names += [stem + suffix for suffix in FILE_SUFFIXES]
    return names


def _existing(path: str, preset: Preset, source: Source | None = None, given: str = "") -> str:
    """The weight file at ``path``, or for a directory the file of ``preset`` in it (:func:`file_candidates`).
    ``given`` is the source string ``path`` came from (``mimic:/weights/mimic``), named in the error."""
    p = Path(path).expanduser()
    origin = f" (from {given!r})" if given and given != path else ""
    if p.is_dir():
        names = file_candidates(preset, source)
        found = next((p / n for n in names if (p / n).is_file()), None)
        if found is None:
            present = sorted(f.name for f in p.iterdir() if f.suffix.lower() in FILE_SUFFIXES)
            raise WeightsUnavailable(
                f"weight directory {p}{origin} has no file for backbone {preset.name!r}: looked for {names}; "
                f"weight files present: {present[:20]}{' ...' if len(present) > 20 else ''}"
            )
        return str(found)
    if not p.is_file():
        raise WeightsUnavailable(f"weight file or directory not found: {p}{origin}")
    return str(p)


# --------------------------------------------------------------------------------------------------------------
# Fetching: every source becomes a local file
# --------------------------------------------------------------------------------------------------------------


def fetch(spec: WeightSpec) -> Path:
    """Return a local file holding the weights of ``spec``, downloading only when the host is reachable."""
    if spec.kind == "file":
        return Path(spec.location)
    if spec.kind == "hub":
        return _fetch_hub(spec.location)
    if spec.kind == "url":
        return _fetch_url(spec.location)
    raise ValueError(f"nothing to fetch for a {spec.kind!r} source")


def check_offline(spec: WeightSpec) -> None:
    """Offline (:func:`offline`), find a hub or URL source's file now, where a run on this node would look for it
    (the weights directory, then the Hugging Face cache), and raise :class:`WeightsUnavailable` with the
    instruction to provide it when it is in neither. Touches no network. Online it does nothing: a run downloads
    what it needs, and a download cannot be checked without making it. (A Hugging Face encoder's own check is
    :func:`scaling.models.hf.check_cached`.)"""
    if offline() and spec.kind in ("hub", "url"):
        fetch(spec)  # offline, fetch reads the weights directory and the cache and raises before any network


def offline() -> bool:
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "SCALING_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when ``url``'s host resolves and accepts a TCP connection within ``timeout`` seconds.

    getaddrinfo has no timeout of its own, so the probe runs in a daemon thread that is abandoned on timeout.
    """
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _how_to_provide(what: str, filename: str, reason: str) -> str:
    return (
        f"cannot load {what}: {reason}. Provide the weights as a local file instead: either copy it to "
        f"{weights_dir() / filename} (directory set by $SCALING_WEIGHTS_DIR), or set model.pretrained "
        f"(grid.pretrained) to '<source>:/path/to/file' or a plain path (.safetensors, .pt/.pth/.bin or BiT .npz). "
        "Hub weights already in the Hugging Face cache are used offline with HF_HUB_OFFLINE=1."
    )


def _local_override(stem: str) -> Path | None:
    for suffix in ("", *FILE_SUFFIXES):
        p = weights_dir() / f"{stem}{suffix}"
        if p.is_file() and (suffix or p.suffix in FILE_SUFFIXES):
            return p
    return None


def _fetch_hub(name: str) -> Path:
    import timm
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    local = _local_override(name)
    if local is not None:
        return local
    cfg = timm.models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise WeightsUnavailable(f"timm's pretrained config {name!r} has no Hugging Face hub id")
    filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for local_only in (True, False):
        if not local_only:
            reason = (
                "offline mode (HF_HUB_OFFLINE/SCALING_OFFLINE) and not in the cache" if offline()
                else f"{constants.ENDPOINT} is unreachable" if not _reachable(constants.ENDPOINT) else ""
            )
            if reason:
                raise WeightsUnavailable(_how_to_provide(f"hub weights {repo}", f"{name}.safetensors", reason))
        for filename in filenames:
            try:
                return Path(hf_hub_download(repo, filename, local_files_only=local_only))
            except (LocalEntryNotFoundError, EntryNotFoundError):
                continue
    raise WeightsUnavailable(f"hub repo {repo} has none of {filenames}")


def _fetch_url(url: str) -> Path:
    filename = Path(urllib.parse.urlsplit(url).path).name
    target = weights_dir() / filename
    if target.is_file():
        return target
    if offline():
        raise WeightsUnavailable(_how_to_provide(url, filename, "offline mode (HF_HUB_OFFLINE/SCALING_OFFLINE)"))
    if not _reachable(url):
        raise WeightsUnavailable(_how_to_provide(url, filename, "the host is unreachable"))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download to a temporary file in the same directory and rename, so an interrupted download never leaves a
    # truncated checkpoint where the next run would trust it.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# --------------------------------------------------------------------------------------------------------------
# Reading: every file becomes a timm-named state dict
# --------------------------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "module")
_PREFIXES = ("module.", "_orig_mod.", "backbone.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a state dict with timm parameter names.

    ``.safetensors`` via safetensors; ``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)`` (a
    pickle can execute code, so arbitrary objects are refused), unwrapping ``{"state_dict": ...}``-style
    containers and ``module.``/``backbone.`` prefixes (DDP, our :class:`~scaling.models.TransferModel`);
    ``.npz`` in the official BiT layout via :func:`bit_npz_to_state_dict`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    elif suffix in (".pt", ".pth", ".bin"):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        while isinstance(sd, dict) and not _is_tensor_dict(sd):
            inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
            if inner is None:
                raise CheckpointMismatch(f"{path}: no state dict found (top-level keys: {sorted(sd)[:10]})")
            sd = inner
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:  # numpy's default, stated: object arrays are pickles
            sd = bit_npz_to_state_dict(npz)
    else:
        raise ValueError(f"unsupported weight file {path.name!r}; expected one of {list(FILE_SUFFIXES)}")
    return _strip_prefixes(sd)


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


_BIT_UNIT = re.compile(r"block(\d+)/unit(\d+)/(a|b|c)/(proj/)?(standardized_conv2d/kernel|group_norm/(gamma|beta))$")


def bit_npz_to_state_dict(npz, prefix: str = "resnet/") -> dict[str, torch.Tensor]:
    """Convert an official BiT ``.npz`` (big_transfer TF/JAX layout) to timm ``ResNetV2`` names.

    Mirrors ``timm.models.resnetv2._load_weights`` (the tests check both give identical outputs) but produces
    a state dict, so npz files share the shape-checked loader with every other format. Kernels are HWIO in
    the file and OIHW in PyTorch.
    """

    def t(a) -> torch.Tensor:
        a = np.asarray(a)
        return torch.from_numpy(a.transpose(3, 2, 0, 1).copy() if a.ndim == 4 else a.copy())

    keys = [k for k in npz.keys() if k.startswith(prefix)]
    if f"{prefix}root_block/standardized_conv2d/kernel" not in keys:
        raise CheckpointMismatch(
            f"not a BiT npz: no '{prefix}root_block/standardized_conv2d/kernel' (first keys: {sorted(npz.keys())[:5]})"
        )
    sd = {
        "stem.conv.weight": t(npz[f"{prefix}root_block/standardized_conv2d/kernel"]),
        "norm.weight": t(npz[f"{prefix}group_norm/gamma"]),
        "norm.bias": t(npz[f"{prefix}group_norm/beta"]),
    }
    if f"{prefix}head/conv2d/kernel" in keys:
        sd["head.fc.weight"] = t(npz[f"{prefix}head/conv2d/kernel"])
        sd["head.fc.bias"] = t(npz[f"{prefix}head/conv2d/bias"])
    for key in keys:
        m = _BIT_UNIT.search(key[len(prefix):])
        if not m:
            continue
        stage, unit, sub, proj, kind = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4], m[5]
        block = f"stages.{stage}.blocks.{unit}."
        idx = "abc".index(sub) + 1
        if proj:
            sd[block + "downsample.conv.weight"] = t(npz[key])
        elif kind.startswith("standardized"):
            sd[block + f"conv{idx}.weight"] = t(npz[key])
        else:
            sd[block + f"norm{idx}.{'weight' if m[6] == 'gamma' else 'bias'}"] = t(npz[key])
    return sd


# --------------------------------------------------------------------------------------------------------------
# Loading: one shape-checked path for every format
# --------------------------------------------------------------------------------------------------------------


def classifier_keys(model: torch.nn.Module) -> set[str]:
    """Names of the classifier head's tensors in ``model``'s state dict (from timm's ``pretrained_cfg``)."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return {k for k in model.state_dict() if any(k.startswith(h + ".") for h in heads)}


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], filter_fn=None, origin: str = "") -> None:
    """Load a timm-named ``state_dict`` into the timm ``model`` except its classifier head.

    The upstream head (1000, 21843 or 20 classes) never fits the downstream task, so it is always skipped
    and the caller initialises the new one. ``filter_fn(state_dict, model)`` is the family's timm checkpoint
    filter (ViT: position-embedding resampling for a new resolution). The first-layer weights are adapted
    when the model has a different number of input channels. Every other tensor must be present with the
    right shape; otherwise :class:`CheckpointMismatch` names the first one that is not.
    """
    from timm.models import adapt_input_conv

    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    head = classifier_keys(model)
    own = model.state_dict()
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    where = f" in {origin}" if origin else ""
    # Walk the backbone in module order so "first" means the layer closest to the input.
    for key, expected in own.items():
        if key in head:
            continue
        if key not in state_dict:
            missing = [k for k in own if k not in head and k not in state_dict]
            raise CheckpointMismatch(f"checkpoint{where} lacks backbone tensor {key!r} ({len(missing)} missing)")
        value = state_dict[key]
        if first_conv and key == f"{first_conv}.weight" and value.ndim == 4 and value.shape[1] != expected.shape[1]:
            value = adapt_input_conv(expected.shape[1], value)
            state_dict = dict(state_dict, **{key: value})
        if value.shape != expected.shape:
            raise CheckpointMismatch(
                f"first mismatching tensor {key!r}{where}: checkpoint {tuple(value.shape)} vs backbone "
                f"{tuple(expected.shape)} (is the checkpoint for a different architecture?)"
            )
    # Upstream heads may be shaped differently from ours (timm's ViT pre_logits, a conv vs linear fc).
    extra = [k for k in state_dict if k not in own and k.split(".")[0] != "head"]
    if extra:
        raise CheckpointMismatch(f"checkpoint tensor {extra[0]!r}{where} has no counterpart in the backbone")
    kept = {k: v for k, v in state_dict.items() if k in own and k not in head}
    model.load_state_dict(kept, strict=False)
