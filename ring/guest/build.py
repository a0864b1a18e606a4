"""Build guest programs from C with gcc into flat binaries, cached by content.

A program is one C file in programs/ compiled with the runtime (crt0.S,
runtime.c, link.ld) into an ELF at PROGRAM_GPA, then objcopy'd to a flat
image. The cache key covers every source byte, the flags and the compiler's
version, so an edit or a new gcc rebuilds and nothing stale is ever loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import GuestBuildError
from .layout import PROGRAM_MAX

PROGRAMS = Path(__file__).with_name("programs")
RUNTIME_SOURCES = ("crt0.S", "runtime.c")
CFLAGS = ("-O2", "-std=gnu11", "-ffreestanding", "-fno-pic", "-fno-pie", "-no-pie", "-nostdlib",
          "-static", "-mno-red-zone", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
          "-fno-builtin", "-mgeneral-regs-only", "-Wall", "-Werror", "-Wl,--build-id=none")


def cache_dir() -> Path:
    base = os.environ.get("COLO_RING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "colo-ring")
    return Path(base) / "guests"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestBuildError(f"{name} was not found on PATH: guest programs are compiled from C when "
                              f"first used (Debian: apt-get install gcc binutils)")
    return path


def build_program(source: str | Path, include_dirs: tuple[Path, ...] = ()) -> bytes:
    """Return the flat binary of a guest program (a file name in programs/ or a path)."""
    source = Path(source)
    if not source.is_absolute() and not source.exists():
        source = PROGRAMS / source
    if not source.exists():
        raise GuestBuildError(f"guest program source {source} does not exist")
    gcc, objcopy = _tool("gcc"), _tool("objcopy")
    inputs = [source] + [PROGRAMS / name for name in RUNTIME_SOURCES]
    digest = hashlib.sha256()
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    for part in (version, " ".join(CFLAGS), *(str(d) for d in include_dirs)):
        digest.update(part.encode())
    headers = sorted(PROGRAMS.glob("*.h")) + [h for d in include_dirs for h in sorted(Path(d).glob("*.h"))]
    for path in inputs + [PROGRAMS / "link.ld", *headers]:
        digest.update(path.read_bytes())
    target = cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.bin"
    if target.exists():
        return target.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="colo-guest-") as tmp:
        elf = Path(tmp) / f"{source.stem}.elf"
        flat = Path(tmp) / f"{source.stem}.bin"
        includes = [f"-I{PROGRAMS}"] + [f"-I{d}" for d in include_dirs]
        command = [gcc, *CFLAGS, *includes, "-T", str(PROGRAMS / "link.ld"), "-o", str(elf),
                   *(str(p) for p in inputs)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise GuestBuildError(f"guest program {source.name} does not build:\n{result.stderr.strip()}")
        result = subprocess.run([objcopy, "-O", "binary", str(elf), str(flat)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise GuestBuildError(f"objcopy of {source.name} failed:\n{result.stderr.strip()}")
        image = flat.read_bytes()
        if len(image) > PROGRAM_MAX:
            raise GuestBuildError(f"guest program {source.name} is {len(image)} bytes, more than the "
                                  f"{PROGRAM_MAX} bytes the layout leaves for it")
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(image)
        os.replace(partial, target)       # atomic: concurrent builders never see half a file
    return image
