"""Where does AOTInductor + distr::attention crash on the GPU? Session 2: aoti_load_package
segfaulted in _load_aoti for a module that is only our op (G=1/2, autotune on/off).

Each case builds a package in one child process and loads + runs it in a second, fresh one
(faulthandler on; a native backtrace from gdb where the machine has it). Case G=0 is the control
without our op (SDPA only, no Triton kernel): does loading any AOTI package work on this machine?
Session 3 (H200, torch 2.11): it does not, G=0 segfaults in _load_aoti too. G=-1 is the same
control on the CPU; a failed load is retried with run_single_threaded=True.
Session 4 (H100, same image): the native backtrace (notes/segv_backtrace.c) puts the crash in
libstdc++'s std::regex compiler, inlined into the package's wrapper.so, under
torch::aot_inductor::parse_device_str. Suspect: the wrapper.so is built against the system
compiler's libstdc++ headers while the process runs an older libstdc++. So each load prints the
libstdc++ it has mapped, and a failed load is retried with the compiler's libstdc++ preloaded.
"""
import faulthandler
import os
import shutil
import subprocess
import sys
import tempfile

import torch

faulthandler.enable()


class Op(torch.nn.Module):
    def __init__(self, G):
        super().__init__()
        self.G = G

    def forward(self, q, k, v):
        if self.G == 0:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.ops.distr.attention(q, k, v, None, True, None, True, self.G, 64, 16, "mean", "lsh", 0)[0]


def build(G, path):
    import distr_compile  # noqa: F401

    torch.manual_seed(0)
    device, dtype = ("cpu", torch.float32) if G < 0 else ("cuda", torch.float16)
    q = torch.randn(2, 8, 300, 64, device=device, dtype=dtype)
    k, v = (torch.randn(2, 2, 300, 64, device=device, dtype=dtype) for _ in range(2))
    m = Op(max(G, 0))
    prog = torch.export.export(m, (q, k, v))
    torch._inductor.aoti_compile_and_package(prog, package_path=path)
    torch.save({"args": (q, k, v), "ref": m(q, k, v)}, path + ".io")
    print("packaged", path, os.path.getsize(path), "bytes", flush=True)


def load(G, path, single_threaded=False):
    if G > 0:
        import distr_compile  # noqa: F401
    io = torch.load(path + ".io")
    with open("/proc/self/maps") as maps:
        print("libstdc++ mapped:", sorted({line.split()[-1] for line in maps if "libstdc++" in line}))
    print("loading, run_single_threaded =", single_threaded, flush=True)
    runner = torch._inductor.aoti_load_package(path, run_single_threaded=single_threaded)
    print("loaded", flush=True)
    out = runner(*io["args"])
    if G >= 0:
        torch.cuda.synchronize()
    ref = io["ref"]
    print("ran; rel err vs eager", ((out.float() - ref.float()).norm() / ref.float().norm()).item(), flush=True)


def compiler_libstdcxx():
    out = subprocess.run(["c++", "-print-file-name=libstdc++.so.6"], capture_output=True, text=True)
    version = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    print("compiler:", version, "its libstdc++:", os.path.realpath(out.stdout.strip()), flush=True)
    return os.path.realpath(out.stdout.strip())


def child(*argv, preload=()):
    """Run this file with ``argv`` in a fresh process; on a crash, print gdb's backtrace where the
    machine has gdb, else the native frames from notes/segv_backtrace.c (preloaded after ``preload``)."""
    cmd = [sys.executable, __file__, *map(str, argv)]
    env = os.environ | {"DISTR_COMPILE_AUTOTUNE": "0"}
    if shutil.which("gdb"):
        cmd = ["gdb", "-batch", "-ex", "run", "-ex", "bt 25", "--args", *cmd]
    else:
        so = os.path.join(tempfile.gettempdir(), "segv_backtrace.so")
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "segv_backtrace.c")
        subprocess.run(["cc", "-shared", "-fPIC", "-o", so, src], check=True)
        preload = (*preload, so)
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    err = r.stderr[-5000:]
    if shutil.which("c++filt"):
        err = subprocess.run(["c++filt"], input=err, capture_output=True, text=True).stdout
    print(r.stdout[-3000:], err, "rc", r.returncode, flush=True)
    return r.returncode


if __name__ == "__main__":
    if len(sys.argv) > 1:
        {"build": build, "load": load}[sys.argv[1]](int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:]))
    else:
        tmp = tempfile.mkdtemp()
        for G in (-1, 0, 2):
            path = os.path.join(tmp, f"g{G}.pt2")
            print(f"=== G={G} build", flush=True)
            if child("build", G, path) == 0:
                print(f"=== G={G} load in a fresh process", flush=True)
                if child("load", G, path) != 0:
                    print(f"=== G={G} load with the compiler's libstdc++ preloaded", flush=True)
                    child("load", G, path, preload=[compiler_libstdcxx()])
