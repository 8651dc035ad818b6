"""Stand-in of the sampling step loop, as A1111 v1.10 and Forge run it:

- modules/sd_samplers_cfg_denoiser.py ``CFGDenoiser``: ``step`` counts the model calls of a pass
  (``Sampler.initialize`` sets it to 0), ``steps`` and ``total_steps`` are set by
  ``Sampler.launch_sampling`` (``total_steps = config.total_steps(steps)``,
  ``SamplerData.total_steps``: ``steps``, doubled for ``second_order`` samplers such as Heun); ``forward`` builds a
  ``CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond,
  uncond, self)``, runs ``cfg_denoiser_callback``, calls the model, then ``self.step += 1``;
- modules/sd_samplers_common.py ``launch_sampling`` sets ``state.sampling_steps = steps`` and
  ``state.sampling_step = 0``; ``callback_state`` (the k-diffusion callback, after each step
  ``i``) sets ``state.sampling_step = i``;
- k-diffusion ``sample_euler`` calls the model once per step, ``sample_heun`` twice except on
  the last step.
"""

from modules import script_callbacks, shared


# A1111 v1.10 / Forge modules/sd_samplers_cfg_denoiser.py: CFGDenoiser


class CFGDenoiser:
    def __init__(self, p):
        self.p = p
        self.step = 0
        self.steps = None
        self.total_steps = None

    def forward(self, model_call):
        params = script_callbacks.CFGDenoiserParams(None, None, None, shared.state.sampling_step,
                                                    shared.state.sampling_steps, None, None, self)
        script_callbacks.cfg_denoiser_callback(params)
        model_call()
        self.step += 1


def sample(p, steps, model_call, second_order=False):
    """One sampling pass of ``steps`` steps; ``model_call(i)`` is the model evaluation of step i."""
    denoiser = CFGDenoiser(p)
    denoiser.steps = steps
    denoiser.total_steps = 2 * steps if second_order else steps
    shared.state.sampling_steps, shared.state.sampling_step = steps, 0
    for i in range(steps):
        for _ in range(2 if second_order and i < steps - 1 else 1):
            denoiser.forward(lambda: model_call(i))
        shared.state.sampling_step = i
