"""What every benchmark script shares: the machine description and writing its JSON result."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save_result(result: dict, out: str | Path) -> None:
    """Record the end load average, write ``result`` as JSON to ``out`` and say so."""
    env = result["environment"]
    env["loadavg_end"] = os.getloadavg()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nload average (1/5/15 min) at start {env.get('loadavg_start')}, at end {env['loadavg_end']}; "
          f"total {result.get('wall_s', 0):.0f} s\nsaved {out}")
