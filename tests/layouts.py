"""Source checkpoints built key by key, as the source code writes them, and independent
reference forwards written from the sources' equations (not from fpd_convert.models)."""
import math

import numpy as np
import torch

ROWS = [3000, 50, 1200, 7, 400]


class NotATensor:
    """Something a checkpoint may pickle that weights_only loading must refuse."""


def dlrm_state(rows=ROWS, m=8, bottom=(13, 16), top=(32, 1), interaction="dot", itself=False, weighted=False,
               ddp=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = {}
    for i, n in enumerate(rows):
        s[f"emb_l.{i}.weight"] = torch.randn(n, m, generator=g) * 0.3
    if weighted:
        for i, n in enumerate(rows):
            s[f"v_W_l.{i}"] = torch.rand(n, generator=g) + 0.5
    b = list(bottom) + [m]
    nf = len(rows) + 1
    width = {"dot": m + nf * (nf - 1) // 2 + (nf if itself else 0), "cat": nf * m}[interaction]
    t = [width] + list(top)
    mid = "module." if ddp else ""
    for name, sizes in (("bot_l", b), ("top_l", t)):
        for k in range(len(sizes) - 1):
            s[f"{name}.{mid}{2 * k}.weight"] = torch.randn(sizes[k + 1], sizes[k], generator=g) / math.sqrt(sizes[k])
            s[f"{name}.{mid}{2 * k}.bias"] = torch.randn(sizes[k + 1], generator=g) * 0.1
    return s


def dlrm_checkpoint(state):
    """The dict `dlrm_s_pytorch.py --save-model` writes, numpy scalars included."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD(params, lr=0.1)
    return {"state_dict": state, "epoch": 0, "iter": 1024, "nepochs": 1, "nbatches": 4096, "nbatches_test": 512,
            "train_loss": np.float32(0.4512), "total_loss": 0.0, "test_acc": np.float64(0.7891),
            "test_auc": np.float64(0.7654), "opt_state_dict": opt.state_dict()}


def ref_dlrm_forward(s, dense, ids, interaction="dot", itself=False, weighted=False, ddp=False):
    """dlrm_s_pytorch.py's DLRM_Net.forward, written out: probability (B, 1)."""
    mid = "module." if ddp else ""

    def mlp(name, x, sigmoid_last):
        k = 0
        while f"{name}.{mid}{k}.weight" in s:
            x = x @ s[f"{name}.{mid}{k}.weight"].T + s[f"{name}.{mid}{k}.bias"]
            last = f"{name}.{mid}{k + 2}.weight" not in s
            x = torch.sigmoid(x) if (last and sigmoid_last) else torch.relu(x)
            k += 2
        return x

    x = mlp("bot_l", dense, False)
    ly = []
    for i in range(ids.shape[1]):
        e = s[f"emb_l.{i}.weight"][ids[:, i]]
        if weighted:
            e = e * s[f"v_W_l.{i}"][ids[:, i]].unsqueeze(1)
        ly.append(e)
    if interaction == "cat":
        r = torch.cat([x] + ly, dim=1)
    else:
        t = [x] + ly
        feats = [x]
        for i in range(len(t)):
            for j in range(i + (1 if itself else 0)):
                feats.append((t[i] * t[j]).sum(1, keepdim=True))
        r = torch.cat(feats, dim=1)
    return mlp("top_l", r, True)


def torchrec_state(rows=ROWS, d=8, dense_in=13, dense_layers=(16,), over=(32, 1), variant="dot", dcn_layers=2,
                   low_rank=4, branch1=(24,), branch2=(16,), prefix="", seed=0):
    g = torch.Generator().manual_seed(seed)
    s = {}
    for i, n in enumerate(rows):
        s[f"sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{i}.weight"] = torch.randn(n, d, generator=g) * 0.3

    def mlp(prefix_, sizes):
        for k in range(len(sizes) - 1):
            s[f"{prefix_}{k}._linear.weight"] = torch.randn(sizes[k + 1], sizes[k], generator=g) / math.sqrt(sizes[k])
            s[f"{prefix_}{k}._linear.bias"] = torch.randn(sizes[k + 1], generator=g) * 0.1

    mlp("dense_arch.model._mlp.", [dense_in] + list(dense_layers) + [d])
    f = len(rows)
    n = (f + 1) * d
    if variant == "dcn":
        for l_ in range(dcn_layers):
            s[f"inter_arch.crossnet.W_kernels.{l_}"] = torch.randn(n, low_rank, generator=g) * 0.1
            s[f"inter_arch.crossnet.V_kernels.{l_}"] = torch.randn(low_rank, n, generator=g) * 0.1
            s[f"inter_arch.crossnet.bias.{l_}"] = torch.randn(n, generator=g) * 0.1
        width = n
    elif variant == "projection":
        mlp("inter_arch.interaction_branch1.model._mlp.", [n] + list(branch1))
        mlp("inter_arch.interaction_branch2.model._mlp.", [n] + list(branch2))
        width = d + (branch1[-1] // d) * (branch2[-1] // d)
    else:
        width = d + math.comb(f, 2) + f
    mlp("over_arch.model.0._mlp.", [width] + list(over[:-1]))
    s["over_arch.model.1.weight"] = torch.randn(over[-1], over[-2], generator=g) / math.sqrt(over[-2])
    s["over_arch.model.1.bias"] = torch.randn(over[-1], generator=g) * 0.1
    return {prefix + k: v for k, v in s.items()}


def ref_torchrec_forward(s, dense, ids, variant="dot"):
    """TorchRec DLRM / DLRM_DCN / DLRM_Projection forward, written out: logits (B, 1)."""
    def mlp(prefix_, x):
        k = 0
        while f"{prefix_}{k}._linear.weight" in s:
            x = torch.relu(x @ s[f"{prefix_}{k}._linear.weight"].T + s[f"{prefix_}{k}._linear.bias"])
            k += 1
        return x

    x = mlp("dense_arch.model._mlp.", dense)
    names = [k for k in s if k.startswith("sparse_arch.")]
    ly = [s[k][ids[:, i]] for i, k in enumerate(names)]
    t = [x] + ly
    b, d = x.shape
    if variant == "dcn":
        x0 = torch.cat(t, dim=1)
        xl = x0
        l_ = 0
        while f"inter_arch.crossnet.W_kernels.{l_}" in s:
            w, v, bias = (s[f"inter_arch.crossnet.{n}.{l_}"] for n in ("W_kernels", "V_kernels", "bias"))
            xl = x0 * (xl @ v.T @ w.T + bias) + xl
            l_ += 1
        r = xl
    elif variant == "projection":
        flat = torch.cat(t, dim=1)
        y = mlp("inter_arch.interaction_branch1.model._mlp.", flat).reshape(b, -1, d)
        z = mlp("inter_arch.interaction_branch2.model._mlp.", flat).reshape(b, d, -1)
        r = torch.cat([x, torch.bmm(y, z).reshape(b, -1)], dim=1)
    else:
        feats = [x] + [(t[i] * t[j]).sum(1, keepdim=True) for i in range(len(t)) for j in range(i + 1, len(t))]
        r = torch.cat(feats, dim=1)
    r = mlp("over_arch.model.0._mlp.", r)
    return r @ s["over_arch.model.1.weight"].T + s["over_arch.model.1.bias"]


def batch(rows=ROWS, b=64, dense_in=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(b, dense_in, generator=g) * 3
    ids = torch.stack([torch.randint(0, n, (b,), generator=g) for n in rows], dim=1)
    return dense, ids
