"""Checkpoints that survive a kill at any point. ``CheckpointStore`` keeps the newest checkpoint in
``<path>/`` and the one before in ``<path>.prev/``; each holds ``state.pt`` (and at scale
``trainable.safetensors``) and, written last, ``manifest.json`` with every file's size and sha256.
A new checkpoint is written into a fresh folder and swapped in by renames; on load, a checkpoint
that fails its checksums is set aside with a warning for the previous one, and ``CheckpointError``
says when none is usable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from toy.core.events import RUN_LOGGER, pause_point
from toy.core.files import dir_mode, file_mode, fsync_dir, sha256_file

log = logging.getLogger(RUN_LOGGER)


class CheckpointError(RuntimeError):
    """A run directory's checkpoints exist but none of them can be read."""


def _verify(folder: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when every file matches its checksum, else (None, the reason)."""
    mf = folder / "manifest.json"
    if not mf.is_file():
        return None, "no manifest.json (incomplete)"
    try:
        manifest = json.loads(mf.read_text())
    except ValueError:
        return None, "manifest.json is corrupt"
    for name, rec in manifest.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            return None, f"{name} is missing"
        if f.stat().st_size != rec["bytes"]:
            return None, f"{name} has {f.stat().st_size} bytes, the manifest says {rec['bytes']}"
        if sha256_file(f) != rec["sha256"]:
            return None, f"{name} fails its sha256 checksum"
    return manifest, None


class CheckpointStore:
    """Checkpoints in ``<path>/`` (newest) and ``<path>.prev/`` (the one before). ``save`` writes a
    fresh folder (``state.pt``, optional ``trainable.safetensors``, then ``manifest.json`` with
    sizes and sha256) and swaps it in by renames, so a kill at any point leaves a complete one.
    ``load`` verifies the checksums and falls back, with a warning, to the previous checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.prev = self.path.with_name(self.path.name + ".prev")

    def exists(self) -> bool:
        return self.path.exists() or self.prev.exists() or self.path.with_suffix(".pt").is_file()

    def remove(self) -> None:
        """Delete every checkpoint of this store (once what they lead to is saved)."""
        for folder in (self.path, self.prev, self.path.with_name(self.path.name + ".corrupt")):
            shutil.rmtree(folder, ignore_errors=True)

    def save(self, state: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.path.name}.tmp."))
        try:
            os.chmod(tmp, dir_mode())
            names = []
            if tensors is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
                names.append("trainable.safetensors")
            torch.save(state, tmp / "state.pt")
            names.append("state.pt")
            files = {}
            for name in names:
                f = tmp / name
                os.chmod(f, file_mode())
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                files[name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            pause_point("checkpoint-files")
            manifest = {"format": 1, "step": state.get("step"), "files": files}
            with open(tmp / "manifest.json", "w") as fh:
                json.dump(manifest, fh, indent=1)
                fh.flush()
                os.fchmod(fh.fileno(), file_mode())
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            pause_point("checkpoint-manifest")
            if self.path.exists():
                if self.prev.exists():
                    shutil.rmtree(self.prev)
                os.replace(self.path, self.prev)
            pause_point("checkpoint-rotate")
            os.replace(tmp, self.path)
            fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _read(self, folder: Path, manifest: dict | None) -> tuple[dict, dict | None]:
        tensors = None
        if (folder / "trainable.safetensors").is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(folder / "trainable.safetensors"))
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        return state, tensors

    def load(self, repair: bool = True) -> tuple[dict, dict | None] | None:
        """``(state, tensors)`` of the newest checkpoint that passes its checksums (``tensors`` is
        ``None`` when none were saved); ``None`` when there is none; ``CheckpointError`` when there
        are checkpoints but none is readable. ``repair`` (the one process that writes): remove
        folders of killed writes and set a damaged newest checkpoint aside."""
        for stale in self.path.parent.glob(f".{self.path.name}.tmp.*") if repair else ():
            shutil.rmtree(stale, ignore_errors=True)  # a write killed before its swap
        problems = []
        for folder in (self.path, self.prev):
            if not folder.exists():
                continue
            manifest, why = _verify(folder)
            if manifest is None and why.startswith("no manifest") and (folder / "state.pt").is_file():
                manifest, why = {}, None  # written before manifests existed: read unverified
            if manifest is not None:
                try:
                    state, tensors = self._read(folder, manifest)
                except Exception as exc:  # noqa: BLE001 - any unreadable file means: try the previous one
                    why = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                else:
                    if problems:
                        log.warning("checkpoint %s is unusable (%s; set aside as %s.corrupt); resuming from "
                                    "the previous one, %s", problems[-1][0], problems[-1][1], self.path.name, folder)
                    return state, tensors
            problems.append((folder, why))
            if repair and folder == self.path and self.prev.exists():
                # set the damaged newest aside, so that the next save does not rotate it over the
                # previous, good one
                bad = self.path.with_name(self.path.name + ".corrupt")
                shutil.rmtree(bad, ignore_errors=True)
                os.replace(self.path, bad)
        legacy = self.path.with_suffix(".pt")
        if not problems and legacy.is_file():  # a single-file toy checkpoint of an older version
            return torch.load(legacy, map_location="cpu", weights_only=False), None
        if problems:
            detail = "; ".join(f"{f.name}: {why}" for f, why in problems)
            raise CheckpointError(f"no usable checkpoint in {self.path.parent} ({detail}); "
                                  "start afresh with --overwrite")
        return None
