"""Langevin-type samplers (torch only): SGLD, MALA, underdamped Langevin, stochastic proximal samplers (SPS-SGLD,
SPS-MALA), test targets and sample-quality metrics. Diffusion inference (DDPM, DDIM, RTK) lives in
:mod:`rlkit.samplers.diffusion` and :mod:`rlkit.samplers.rtk`.

An energy ``U`` (``energy_fn(x) -> [n_chains]``) and/or its gradient (``grad_fn(x) -> [n_chains, d]``) in, a batch of
chains ``[n_chains, d]`` out, as a :class:`SampleResult` with per-chain evaluation counts."""

from rlkit.samplers.langevin import SampleResult, make_generator, mala, mala_log_accept, sgld, uld
from rlkit.samplers.metrics import cov_error, mean_error, mmd_rbf, noise_floor, sliced_wasserstein, tv_histogram
from rlkit.samplers.sps import FiniteSum, draw_batch, proximal_sampler, sgld_minibatch, sps
from rlkit.samplers.targets import Gaussian, GaussianMixture, MixtureFiniteSum

__all__ = ["SampleResult", "make_generator", "mala", "mala_log_accept", "sgld", "uld",
           "cov_error", "mean_error", "mmd_rbf", "noise_floor", "sliced_wasserstein", "tv_histogram",
           "FiniteSum", "draw_batch", "proximal_sampler", "sgld_minibatch", "sps",
           "Gaussian", "GaussianMixture", "MixtureFiniteSum"]
