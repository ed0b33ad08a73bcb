"""End to end through ComfyUI's interfaces: the loader node (on the ComfyUI stand-in) against a
real local cluster; ComfyUI's apply_model over several sampling steps must give exactly what
the same model gives in one process (`fleet run-local`).

Skipped (with the reason) when FLEET_BUILD_DIR/bin lacks fleet-coordinator or fleet-worker.
"""


import torch

from conftest_client import cluster, run_fleet  # noqa: F401 (fixture)
from test_client_e2e import EXPERT, _bitwise_equal, _inputs, _model, _run_local
from test_node import Loader, folder_paths, mm


def test_comfy_sampling_steps_equal_run_local(cluster, tmp_path):
    name, path = _model(cluster, "tiny-node.safetensors", "--preset", "tiny", "--seed", 21,
                        "--dtype", "f32", "--guidance", "true")
    folder_paths.folder_names_and_paths["diffusion_models"] = ([cluster.model_root],
                                                               {".safetensors"})
    mm.interrupt_current_processing(False)
    patcher = Loader().load_unet(name, coordinator=cluster.address, compute_device="cuda:0",
                                 expert_mode_allocations=EXPERT)[0]
    base = patcher.model
    assert base.model_config.unet_config["guidance_embed"] is True
    patcher.pre_run()
    inputs = _inputs(path, tmp_path, "--height", 8, "--width", 8, "--seed", 4)
    x = inputs["x"].clone()
    for step, (s, s_next) in enumerate([(1.0, 0.7), (0.7, 0.4), (0.4, 0.0)]):
        sigma = torch.full((1,), s)
        denoised = base.apply_model(x, sigma, c_crossattn=inputs["context"], y=inputs["y"],
                                    guidance=inputs["guidance"])
        ref = _run_local(path, dict(inputs, x=x, timestep=sigma), tmp_path, "n%d" % step)
        want = x - ref.float() * sigma.view(1, 1, 1, 1)  # CONST.calculate_denoised
        assert _bitwise_equal(denoised, want), "step %d differs from run-local" % step
        # Euler: x <- x + (s_next - s) * (x - denoised) / s
        x = x + (s_next - s) * (x - denoised) / s
