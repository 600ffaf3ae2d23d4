"""Where does AOTInductor + distr::attention crash? Each case in a child process (faulthandler on).
Case G=0 is a control without our op (SDPA): does loading any AOTI package work on this machine?"""
import faulthandler, subprocess, sys, tempfile, os
faulthandler.enable()
import torch
import distr_compile  # noqa: F401


class Op(torch.nn.Module):
    def __init__(self, G):
        super().__init__()
        self.G = G

    def forward(self, q, k, v):
        if self.G == 0:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.ops.distr.attention(q, k, v, None, True, None, True, self.G, 64, 16, "mean", "lsh", 0)[0]


def case(G):
    q = torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    m = Op(G)
    prog = torch.export.export(m, (q, k, v))
    print("exported", flush=True)
    path = torch._inductor.aoti_compile_and_package(prog, package_path=tempfile.mktemp(suffix=".pt2"))
    print("packaged", path, flush=True)
    runner = torch._inductor.aoti_load_package(path)
    print("loaded", flush=True)
    out = runner(q, k, v)
    torch.cuda.synchronize()
    print("ran", flush=True)
    ref = m(q, k, v)
    print("rel err", ((out.float() - ref.float()).norm() / ref.float().norm()).item(), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        case(int(sys.argv[1]))
    else:
        for G in (0, 2):  # session 2: G=1 and G=2, autotune on and off, all crashed in load
            print(f"=== G={G}", flush=True)
            env = os.environ | {"DISTR_COMPILE_AUTOTUNE": "0"}
            r = subprocess.run([sys.executable, __file__, str(G)], env=env, capture_output=True, text=True)
            print(r.stdout[-3000:], r.stderr[-3000:], "rc", r.returncode, flush=True)
