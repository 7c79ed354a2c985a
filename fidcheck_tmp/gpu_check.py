"""GPU check of the FID Inception: parity with torch-fidelity (torch, CPU float32) and throughput."""
import json, os, sys, time
import numpy as np, torch
sys.path.insert(0, os.path.dirname(__file__))
import torch_fidelity.feature_extractor_inceptionv3 as tfi
import jax, jax.numpy as jnp
from rfdit.nn import inception
from rfdit.metrics import fid

out = {"jax_devices": [str(d) for d in jax.devices()], "torch": torch.__version__, "jax": jax.__version__}
orig_load = tfi.FeatureExtractorInceptionV3.load_state_dict
tfi.load_state_dict_from_url = lambda *a, **k: {}
tfi.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
skel = tfi.FeatureExtractorInceptionV3("x", ["2048"])
tfi.FeatureExtractorInceptionV3.load_state_dict = orig_load
g = torch.Generator().manual_seed(0)
def rnd(n, v):
    if n.endswith("conv.weight"): return torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    if n.endswith(("bn.weight", "running_var")): return 0.5 + torch.rand(v.shape, generator=g)
    if n.endswith(("bn.bias", "running_mean")): return 0.2 * torch.randn(v.shape, generator=g)
    if n.startswith("fc."): return 0.01 * torch.randn(v.shape, generator=g)
    return v
torch.save({n: rnd(n, v) for n, v in skel.state_dict().items()}, "/tmp/w.pth")
ref = tfi.FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path="/tmp/w.pth")
model = inception.load_inception("/tmp/w.pth")
rng = np.random.default_rng(0)
for size in (64, 256):
    u8 = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        (b,) = ref(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous())
    b = b.numpy()
    x = (u8 / 127.5 - 1).astype(np.float32)
    a = np.asarray(fid.fid_inception(model=model)(x))
    out[f"rel_err_highest_{size}"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    conv = jax.lax.conv_general_dilated
    jax.lax.conv_general_dilated = lambda *args, precision=None, **kw: conv(*args, precision=None, **kw)
    a2 = np.asarray(fid.fid_inception(model=model)(x))
    jax.lax.conv_general_dilated = conv
    out[f"rel_err_default_precision_{size}"] = float(np.linalg.norm(a2 - b) / np.linalg.norm(b))
print(json.dumps(out), flush=True)
fn = fid.fid_inception(model=model)
for bs in (256, 1024):
    x = jnp.asarray(rng.uniform(-1, 1, (bs, 256, 256, 3)).astype(np.float32))
    fn(x).block_until_ready()
    t = time.perf_counter(); n = 5
    for _ in range(n): y = fn(x)
    y.block_until_ready()
    out[f"images_per_s_b{bs}_256px"] = bs * n / (time.perf_counter() - t)
stats = jax.devices()[0].memory_stats() or {}
out["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
print(json.dumps(out), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_check.json"), "w"), indent=1)
