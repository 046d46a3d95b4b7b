"""The neck's node layout for each ModelSpec.neck: effdet's BiFPN and PANet configs, and a top-down FPN in effdet's format.

effdet builds any neck from a list of nodes (a level, the earlier nodes it fuses, how it weighs them); each
node fuses its inputs, then applies an activation and a separable 3x3 convolution. effdet has no plain
top-down FPN, so `top_down_config` writes one as such a list, by hand; everything that runs it is effdet's.
"""
from __future__ import annotations

import itertools

from effdet.config.fpn_config import bifpn_config, panfpn_config
from omegaconf import OmegaConf


def top_down_config(min_level: int, max_level: int, weight_method: str = "fastattn"):
    """FPN (Lin et al., 2017): each level fuses its backbone map with the coarser level's, coarse to fine.

    effdet takes a cell's outputs as its last num_levels nodes, in level order, so after the top-down pass
    every level but the finest (whose top-down node is already last) is repeated by a one-input node: its
    output convolution. With P3-P5 that is 4 nodes, as in a BiFPN cell, but with 5 inputs instead of 7 and no
    bottom-up path; PANet (effdet's `panfpn_config`) adds that path, with 6 nodes.
    """
    p = OmegaConf.create()
    p.nodes = []
    num_levels = max_level - min_level + 1
    latest = {min_level + i: i for i in range(num_levels)}  # the node id holding each level's newest map
    ids = itertools.count(num_levels)
    for level in range(max_level - 1, min_level - 1, -1):
        p.nodes.append({"feat_level": level, "inputs_offsets": [latest[level], latest[level + 1]],
                        "weight_method": weight_method})
        latest[level] = next(ids)
    for level in range(min_level + 1, max_level + 1):
        p.nodes.append({"feat_level": level, "inputs_offsets": [latest[level]], "weight_method": weight_method})
        latest[level] = next(ids)
    return p


# neck -> the function that lays it out; every neck takes the spec's fusion as its nodes' weight method.
LAYOUTS = {"bifpn": bifpn_config, "pan": panfpn_config, "fpn": top_down_config}


def neck_config(neck: str, fusion: str, min_level: int, max_level: int):
    return LAYOUTS[neck](min_level=min_level, max_level=max_level, weight_method=fusion)
