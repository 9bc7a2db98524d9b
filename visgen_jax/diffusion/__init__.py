"""Gaussian diffusion as pure functions.

schedules        β schedules as pytrees, respacing (carrying the original timesteps), σ ↔ t.
parameterisations  ε / x₀ / v outputs, learned-range variance, x̂₀ clipping and thresholding.
gaussian         q(x_t | x₀), the posterior, p(x_{t-1} | x_t), one-step updates, VB terms.
losses           diffusion_loss: ε/x₀/v MSE, ADM's hybrid loss, P2 weighting.
samplers         ddpm, ddim, ddim_invert, dpmpp_2m, euler, heun; `sample(name, ...)`.
guidance         classifier-free (batch doubling), classifier gradients, loss-on-x̂₀ guidance.
editing          RePaint inpainting plans and the SDEdit-style start.
restoration      Gen2Res: diffuse a degraded image to level K, DDPM back, skip guidance toward it.
gmm              a Gaussian mixture with an exact denoiser, for tests and benchmarks.
"""
