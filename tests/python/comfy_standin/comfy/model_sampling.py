"""Stand-in for comfy/model_sampling.py: the flow-matching pieces Flux and WAN use.

Upstream: comfy/model_sampling.py (CONST, ModelSamplingDiscreteFlow, ModelSamplingFlux,
flux_time_shift, time_snr_shift). Only calculate_input / calculate_denoised / timestep / sigma /
percent_to_sigma are mirrored. WAN (model type FLOW) uses ModelSamplingDiscreteFlow with its
config's shift and the default multiplier 1000: timestep = sigma * 1000.
"""

import math

import torch


def time_snr_shift(alpha, t):
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


def flux_time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


class CONST:
    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma


class ModelSamplingDiscreteFlow(torch.nn.Module):
    def __init__(self, model_config=None):
        super().__init__()
        settings = model_config.sampling_settings if model_config is not None else {}
        self.shift = settings.get("shift", 1.0)
        self.multiplier = settings.get("multiplier", 1000)

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return time_snr_shift(self.shift, 1.0 - percent)


class ModelSamplingFlux(torch.nn.Module):
    def __init__(self, model_config=None):
        super().__init__()
        settings = model_config.sampling_settings if model_config is not None else {}
        self.shift = settings.get("shift", 1.15)

    def timestep(self, sigma):
        return sigma
