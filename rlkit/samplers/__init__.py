"""Langevin-type samplers (torch only): SGLD, MALA, underdamped Langevin, stochastic proximal samplers (SPS-SGLD,
SPS-MALA), test targets and sample-quality metrics; diffusion inference with DDPM, DDIM and the reverse
transition kernel RTK (:mod:`rlkit.samplers.diffusion`, :mod:`rlkit.samplers.rtk`) over an exact or learned
score (:mod:`rlkit.samplers.score_net`).

An energy ``U`` (``energy_fn(x) -> [n_chains]``) and/or its gradient (``grad_fn(x) -> [n_chains, d]``) in, a batch of
chains ``[n_chains, d]`` out, as a :class:`SampleResult` with per-chain evaluation counts."""

from rlkit.samplers.diffusion import OUMixture, ddim, ddpm, ou_scale, ou_var, prior_sample, time_grid
from rlkit.samplers.langevin import SampleResult, make_generator, mala, mala_log_accept, sgld, uld
from rlkit.samplers.metrics import cov_error, mean_error, mmd_rbf, noise_floor, sliced_wasserstein, tv_histogram
from rlkit.samplers.rtk import lobatto_rule, rtk, rtk_nfe
from rlkit.samplers.score_net import LearnedScore, ScoreNet, train_score_net
from rlkit.samplers.sps import FiniteSum, draw_batch, proximal_sampler, sgld_minibatch, sps
from rlkit.samplers.targets import Gaussian, GaussianMixture, MixtureFiniteSum

__all__ = ["SampleResult", "make_generator", "mala", "mala_log_accept", "sgld", "uld",
           "cov_error", "mean_error", "mmd_rbf", "noise_floor", "sliced_wasserstein", "tv_histogram",
           "FiniteSum", "draw_batch", "proximal_sampler", "sgld_minibatch", "sps",
           "Gaussian", "GaussianMixture", "MixtureFiniteSum",
           "OUMixture", "ddim", "ddpm", "ou_scale", "ou_var", "prior_sample", "time_grid",
           "lobatto_rule", "rtk", "rtk_nfe", "LearnedScore", "ScoreNet", "train_score_net"]
