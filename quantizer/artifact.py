"""Writing an artifact: one shard per decoder layer as soon as it is finished, then the global tensors
and the manifest. An unfinished conversion keeps its state in a file beside the shards, so `--resume`
continues it and produces the same bytes as an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from qdllm.engine.artifact import FORMAT_VERSION, MANIFEST, sha256_file

PARTIAL = ".qdllm-partial.json"
# Everything a server needs besides the weights; checkpoint code (*.py) is never copied.
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
          "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


class ArtifactError(ValueError):
    """The output directory cannot be written or resumed; one line naming it and what to do."""


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _write_json(file: Path, data: dict) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, file)


def _umask() -> int:
    """The process umask, which os reports only when it is set (briefly to 077, the safe side)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _changes(old: object, new: object, key: str = "") -> list[str]:
    """Each differing leaf of two headers, as "calibration.seed was 0, now 1": what to put back for --resume."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for k in sorted(old.keys() | new.keys())
                for change in _changes(old.get(k), new.get(k), f"{key}.{k}" if key else k)]
    return [] if old == new else [f"{key} was {old!r}, now {new!r}"]


class ArtifactWriter:
    """`header` is the manifest without the per-layer records and shard hashes: the settings, the source
    and the calibration. A resumed conversion must have the same header."""

    def __init__(self, out: Path, header: dict, n_layers: int, resume: bool):
        self.out, self.n_layers = out, n_layers
        self.header = json.loads(json.dumps(header))  # as it will read back (tuples become lists)
        self.total = n_layers + 1  # one shard per layer, then one for the embedding, final norm and head
        self.layers: list[dict] = []
        self.shards: dict[str, str] = {}
        state_file = out / PARTIAL
        if out.exists() and not out.is_dir():
            raise ArtifactError(f"{out}: is a file; choose a new output directory (nothing was overwritten)")
        self.fresh = not state_file.exists()  # this run starts the conversion (OUT is new or empty)
        self.created = not out.exists()
        try:
            if state_file.exists():
                if not resume:
                    raise ArtifactError(f"{out}: holds an unfinished conversion; add --resume to continue it, or "
                                        "remove the directory")
                self._resume(self._read_state(state_file))
            elif out.exists() and any(out.iterdir()):
                what = "a finished artifact" if (out / MANIFEST).exists() else "not empty"
                raise ArtifactError(f"{out}: {what}; choose a new output directory (nothing was overwritten)")
            out.mkdir(parents=True, exist_ok=True)
            self._save_state()
        except OSError as e:
            raise ArtifactError(f"{out}: cannot be written ({e.strerror}); choose another output directory") from None

    def _read_state(self, file: Path) -> dict:
        try:
            state = json.loads(file.read_text())
            ok = (isinstance(state, dict) and isinstance(state.get("header"), dict)
                  and isinstance(state.get("shards"), dict) and isinstance(state.get("layers"), list)
                  and all(isinstance(r, dict) for r in state["layers"]))
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ArtifactError(f"{file}: unreadable (the state of an unfinished conversion); remove {self.out} "
                                "to convert again from the start")
        return state

    def discard_if_unstarted(self) -> None:
        """A conversion that fails before its first layer leaves nothing to resume: remove what it wrote, so
        that the same command, once the cause is fixed, needs no --resume and no clean-up."""
        if not self.fresh or self.layers:
            return
        for name in (PARTIAL, PARTIAL + ".tmp", shard_name(0, self.total) + ".tmp"):
            (self.out / name).unlink(missing_ok=True)
        if self.created and not any(self.out.iterdir()):
            self.out.rmdir()

    def _resume(self, state: dict) -> None:
        if state["header"] != self.header:
            changes = "; ".join(_changes(state["header"], self.header))
            raise ArtifactError(f"{self.out}: was started with other settings ({changes}); convert again with the "
                                "same settings, or remove the directory")
        for record, (name, digest) in zip(state["layers"], state["shards"].items()):
            if not (self.out / name).exists() or sha256_file(self.out / name) != digest:
                break  # this shard and every later one are redone
            self.layers.append(record)
            self.shards[name] = digest

    @property
    def layers_done(self) -> int:
        return len(self.layers)

    def _save_state(self) -> None:
        _write_json(self.out / PARTIAL, {"header": self.header, "layers": self.layers, "shards": self.shards})

    def _save_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        name = shard_name(index, self.total)
        tmp = self.out / (name + ".tmp")
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}, str(tmp),
                      metadata={"format": "pt"})  # one key: safetensors writes several in random order
        except SafetensorError as e:  # a full disk, a lost permission: not an OSError, though it is one
            raise OSError(f"{tmp}: cannot be written ({str(e).splitlines()[0]})") from None
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files, which no other user could serve
        os.replace(tmp, self.out / name)
        self.shards[name] = sha256_file(self.out / name)

    def shard_path(self, index: int) -> Path:
        return self.out / shard_name(index, self.total)

    def write_layer(self, index: int, tensors: dict[str, torch.Tensor], record: dict) -> None:
        assert index == self.layers_done, "layers are written in order"
        self._save_shard(index, tensors)
        self.layers.append(record)
        self._save_state()

    def finish(self, src: Path, global_tensors: dict[str, torch.Tensor], summary: dict) -> None:
        """The last shard, the copied config and tokenizer files, then the manifest; the state file goes last."""
        self._save_shard(self.n_layers, global_tensors)
        for name in COPIED:
            if (src / name).is_file():
                shutil.copyfile(src / name, self.out / name)
        _write_json(self.out / MANIFEST, {**self.header, **summary, "format_version": FORMAT_VERSION,
                                          "layers": self.layers, "shards": self.shards})
        (self.out / PARTIAL).unlink()
