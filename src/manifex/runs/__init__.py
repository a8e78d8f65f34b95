"""The shared run layer (core): safe files and resumable campaigns of units, run locally or on Ray.

Files — every file manifex writes goes through these (unique temp file, fsync, ``os.replace``):

>>> from manifex.runs import atomic_write_json, atomic_torch_save, atomic_savefig, append_jsonl, read_jsonl
>>> atomic_write_json("out/summary.json", {"pcc": 0.61})          # path first, like Path.write_text
>>> atomic_torch_save({"x": x}, "out/pairs/00001.pt")            # object first, like torch.save
>>> atomic_savefig(fig, "out/figure.png", dpi=110)               # figure first, like fig.savefig
>>> with file_lock("cache/model.pt"): ...                        # inter-process lock (filelock)

Campaigns — independent units with stable ids, one JSON line per finished unit, resume, any executor:

>>> units = [Unit(f"pair{i:05d}", {"index": i}) for i in range(1000)]
>>> records = run_units(units, process, "runs/x", context={"model": model}, batch_size=16,
...                     executor=RayExecutor(workers=4))           # or LocalExecutor() (the default)
"""
from .files import (
    JsonlLog,
    append_jsonl,
    atomic_savefig,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_lock,
    read_jsonl,
    safe_torch_load,
    to_jsonable,
)
from .ray_executor import RayExecutor, import_ray, ship_by_value
from .settings import SETTINGS_FILE, check_settings, tensor_fingerprint
from .units import Executor, LocalExecutor, Unit, run_units, summarize_records, unit_dir, unit_seed

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "atomic_savefig",
    "append_jsonl", "read_jsonl", "file_lock", "to_jsonable", "safe_torch_load", "JsonlLog",
    "check_settings", "tensor_fingerprint", "SETTINGS_FILE",
    "Unit", "run_units", "Executor", "LocalExecutor", "RayExecutor", "import_ray", "ship_by_value", "unit_dir", "unit_seed",
    "summarize_records",
]
