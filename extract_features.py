"""Stage 2: patch embeddings for every slice with an image (README "Stages"; UNI and CONCH as their authors build them).

    python extract_features.py --data data/demo --encoder stain
    python extract_features.py --data data/her2st --encoder uni --weights UNI/pytorch_model.bin --amp
    torchrun --nproc_per_node 4 extract_features.py --data data/hest --encoder conch --weights conch/pytorch_model.bin

Writes <data>/features/<encoder>/<slice>.h5: `embeddings` [N, D] in slice-file row order,
`barcode`, and with --augment `embeddings_aug` [N, 8, D] (identity + the 7 flips/rotations).
Slices of slides without spatial data (prepare_data.py --dataset image) hold no patches: each
batch is cropped from the slide itself, as prepare_data.py would have cropped it.
Weights are only ever read from --weights; nothing is downloaded unless it names a hub id
(--weights hf-hub:MahmoodLab/UNI, as timm writes it), fetched through the Hugging Face cache.
"""
import argparse
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import resolve_weights
from common import UserError, atomic_h5, list_slices, run, slice_path
from runtime import add_runtime_args
from readers import crop_patches, open_image

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
WEIGHTS_HELP = {
    "uni": "MahmoodLab/UNI on Hugging Face (gated): pytorch_model.bin, or --weights hf-hub:MahmoodLab/UNI",
    "conch": "MahmoodLab/CONCH on Hugging Face (gated): pytorch_model.bin, or --weights hf-hub:MahmoodLab/CONCH",
    "resnet50": "timm/resnet50.a1_in1k on Hugging Face: pytorch_model.bin or model.safetensors, "
                "or --weights hf-hub:timm/resnet50.a1_in1k",
}
HUB_FILE = {"uni": "pytorch_model.bin", "conch": "pytorch_model.bin",
            "resnet50": "model.safetensors"}  # in each hub repo


#################################################################################
#                                 Encoders                                      #
#################################################################################

class AttentionalPooler(nn.Module):
    """CONCH's contrastive pooler: learned queries attend over LayerNorm'd ViT tokens."""
    def __init__(self, d_model=512, context_dim=768, n_head=8, n_queries=1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x):                                # x [B, L, C] -> [B, n_queries, d_model]
        x = self.ln_k(x).transpose(0, 1)                 # [L, B, C]
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        return self.attn(q, x, x, need_weights=False)[0].transpose(0, 1)


class ConchVision(nn.Module):
    """CONCH ViT-B/16 at 448 px; output = attentional pool + LayerNorm, before proj_contrast
    (`encode_image(proj_contrast=False, normalize=False)`, the 512-d feature Stem/HINGE use)."""
    def __init__(self):
        super().__init__()
        import timm
        self.trunk = timm.models.vision_transformer.VisionTransformer(
            img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
            num_classes=0, dynamic_img_size=True)
        self.attn_pool_contrast = AttentionalPooler()
        self.ln_contrast = nn.LayerNorm(512)

    def forward(self, x):
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


class StainEncoder:
    """Weight-free H&E features: colour deconvolution (skimage's H&E-DAB matrix, as rgb2hed) and RGB
    statistics plus texture (gradient energy, nuclear and background fractions, coarse-scale
    energy), on the whole patch and on its central half (two scales, both at 56 px: 4x fewer
    pixels than native keeps it above 200 patches/s on 2 CPU cores)."""
    name, dim = "stain", 2 * 37

    def __call__(self, patches):                         # uint8 [B, P, P, 3] -> float32 [B, 74]
        B, P = patches.shape[:2]
        rgb = patches.astype(np.float32) / 255
        whole = pool2(pool2(rgb))                        # the whole patch at 1/4 resolution (56 px)
        centre = pool2(rgb[:, P // 4:P - P // 4, P // 4:P - P // 4])  # its central half at 1/2 (56 px)
        return np.concatenate([self.stats(whole), self.stats(centre)], 1)

    @staticmethod
    def stats(rgb):                                      # float32 [B, H, W, 3] -> [B, 37]
        from skimage.color import hed_from_rgb
        B = len(rgb)
        od = np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6)   # rgb2hed in float32: optical density ...
        hed = np.maximum(od.reshape(-1, 3) @ hed_from_rgb.astype(np.float32), 0).reshape(od.shape)  # ... into H, E, DAB
        chans = np.concatenate([rgb, hed], -1)           # [B, H, W, 6]
        flat = np.ascontiguousarray(chans.reshape(B, -1, 6).transpose(0, 2, 1))  # [B, 6, n]
        q = np.percentile(flat, [10, 50, 90], axis=2).transpose(1, 0, 2).reshape(B, 18)
        gray = chans[..., :3].mean(-1)                   # [B, H, W]
        grad = np.hypot(np.diff(gray, axis=2)[:, :-1], np.diff(gray, axis=1)[:, :, :-1]).reshape(B, -1)
        tex = [grad.mean(1), grad.std(1), (grad > 0.1).mean(1),
               (chans[..., 3] > 0.05).reshape(B, -1).mean(1),  # nuclear (haematoxylin-rich) fraction
               (gray > 0.85).reshape(B, -1).mean(1)]         # background fraction
        for _ in range(2):                               # energy at 2x and 4x coarser scales still
            gray = pool2(gray)
            tex.append(np.abs(np.diff(gray, axis=1)).mean((1, 2)))
        return np.concatenate([flat.mean(2), flat.std(2), q, np.stack(tex, 1)], 1).astype(np.float32)


def pool2(x):
    """2x2 mean pooling over axes 1 and 2 (strided sums: far faster than a 6-d reshape mean)."""
    x = x[:, :x.shape[1] // 2 * 2, :x.shape[2] // 2 * 2]
    return (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4


def build_encoder(name):
    """The network with UNI's / CONCH's / timm's exact construction, and its preprocessing."""
    import timm
    if name == "uni":
        net = timm.create_model("vit_large_patch16_224", pretrained=False, img_size=224, patch_size=16,
                                init_values=1e-5, num_classes=0, dynamic_img_size=True)
        return net, 224, IMAGENET, 1024
    if name == "conch":
        return ConchVision(), 448, OPENAI_CLIP, 512
    if name == "resnet50":
        return timm.create_model("resnet50", pretrained=False, num_classes=0), 224, IMAGENET, 2048
    raise UserError(f"unknown encoder {name!r}; choose uni, conch, resnet50 or stain")


def load_weights(net, name, path):
    """Load an official state dict (nested under `state_dict`/`model`, `module.` prefixes and
    CONCH's `visual.` prefix handled); the first mis-shaped, missing or unexpected key is named."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: weights file not found; get {WEIGHTS_HELP[name]}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for nest in ("state_dict", "model"):
        if isinstance(sd.get(nest), dict):
            sd = sd[nest]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if name == "conch":                                  # the CoCa file also holds the text tower and caption pooler
        sd = {k[len("visual."):]: v for k, v in sd.items()
              if k.startswith(("visual.trunk.", "visual.attn_pool_contrast.", "visual.ln_contrast."))}
    own = net.state_dict()
    for k, v in sd.items():
        if k in own and v.shape != own[k].shape:
            raise UserError(f"{path}: key {k} has shape {tuple(v.shape)} but {name} expects {tuple(own[k].shape)}; "
                            f"are these {name} weights?")
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise UserError(f"{path}: {len(missing)} missing keys (first {missing[:1]}) and {len(unexpected)} unexpected "
                        f"(first {unexpected[:1]}) for {name}; get {WEIGHTS_HELP[name]}")
    net.load_state_dict(sd)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class NeuralEncoder:
    def __init__(self, name, weights, random_init, device, amp):
        self.name, self.device, self.amp = name, torch.device(device), amp
        self.net, self.size, (mean, std), self.dim = build_encoder(name)
        if weights:
            load_weights(self.net, name, weights)
        elif not random_init:
            raise UserError(f"--encoder {name} needs --weights (get {WEIGHTS_HELP[name]}); "
                            "or use --encoder stain, which needs none")
        self.net.eval().to(self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, patches):                         # uint8 [B, P, P, 3] -> float32 [B, D]
        x = torch.from_numpy(np.ascontiguousarray(patches)).to(self.device).permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != self.size:                     # Resize (bicubic) to the encoder's input, as its transform
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - self.mean) / self.std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.net(x).float().cpu().numpy()


#################################################################################
#                                 Extraction                                    #
#################################################################################

def dihedral(patches):
    """The 8 views of Stem's augmentation: identity + PIL transpose ops 0..6 (flips, rotations, transposes)."""
    t = lambda a: a.transpose(0, 2, 1, 3)                # noqa: E731  (swap H and W)
    return [patches, patches[:, :, ::-1], patches[:, ::-1], np.rot90(patches, 1, (1, 2)),
            patches[:, ::-1, ::-1], np.rot90(patches, 3, (1, 2)), t(patches), t(patches[:, ::-1, ::-1])]


def slide_of(f, name):
    """The slide a slice prepared without patches (--dataset image) is cropped from; it must still be there."""
    path = str(f.attrs["slide"])
    if not os.path.isfile(path):
        raise UserError(f"{path}: slide of slice {name} not found (moved or deleted?); put it back, or prepare the "
                        "slice again from its new place (prepare_data.py --dataset image --image NEW_PATH)")
    return path


class SlidePatches:
    """A slice's patches cropped from its slide as they are read, exactly as prepare_data.py crops the
    patches it stores (readers.crop_patches); they are never written to disk."""
    def __init__(self, f, name):
        path = slide_of(f, name)
        self.slide = open_image(path)
        if tuple(self.slide.size) != tuple(int(v) for v in f.attrs["slide_size"]):
            raise UserError(f"{path}: {self.slide.size[0]}x{self.slide.size[1]} px, but slice {name} was prepared "
                            f"from a {'x'.join(str(int(v)) for v in f.attrs['slide_size'])} px slide of that name; "
                            "prepare it again")
        self.pixel = f["pixel"][()]
        self.side, self.size = int(f.attrs["patch_px_native"]), int(f.attrs["patch_size"])

    def __len__(self):
        return len(self.pixel)

    def __getitem__(self, rows):                         # a slice of spots -> uint8 [B, P, P, 3]
        return crop_patches(self.slide, self.pixel[rows], self.side, self.size)


def read_ahead(img, N, batch_size):
    """(first row, patches) batch by batch, the next batch read in a thread while this one is embedded: OpenSlide's
    decoding, PIL's resizing and numpy release the GIL, so reading and embedding share the cores."""
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(img.__getitem__, slice(0, batch_size))
        for s in range(0, N, batch_size):
            patches = nxt.result()
            if s + batch_size < N:
                nxt = pool.submit(img.__getitem__, slice(s + batch_size, s + 2 * batch_size))
            yield s, patches


def embed_slice(src, dst, enc, batch_size, augment, weights_attr):
    """Embed a slice's patches batch by batch, each batch written as it is done: memory holds one
    batch, whatever the number of spots. Patches come from the slice file, or from the slide itself."""
    with h5py.File(src, "r") as f:
        # opened before dst exists
        img = f["img"] if "img" in f else SlidePatches(f, os.path.basename(src)[:-len(".h5")])
        N = len(img)
        with atomic_h5(dst) as out:
            emb = out.create_dataset("embeddings", (N, enc.dim), np.float32)
            aug = out.create_dataset("embeddings_aug", (N, 8, enc.dim), np.float32) if augment else None
            for s, patches in tqdm(read_ahead(img, N, batch_size), total=-(-N // batch_size),
                                   desc=os.path.basename(src), unit="batch", leave=False):
                if augment:
                    views = [enc(np.ascontiguousarray(v)) for v in dihedral(patches)]
                    aug[s:s + len(patches)] = np.stack(views, 1)
                    emb[s:s + len(patches)] = views[0]
                else:
                    emb[s:s + len(patches)] = enc(patches)
            out["barcode"] = f["barcode"][()]
            out.attrs.update(encoder=enc.name, dim=enc.dim, weights=weights_attr, augment=augment)


def is_done(path, name, weights_attr, augment):
    if not os.path.isfile(path):
        return False
    with h5py.File(path, "r") as f:
        return (f.attrs.get("encoder") == name and f.attrs.get("weights") == weights_attr
                and bool(f.attrs.get("augment")) == augment)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder written by prepare_data.py")
    p.add_argument("--encoder", required=True, choices=["uni", "conch", "resnet50", "stain"],
                   help="uni (1024-d), conch (512-d), resnet50 (2048-d) or stain (74-d, weight-free)")
    p.add_argument("--weights", help="weights of the neural encoder: a local file (official pytorch_model.bin), or "
                                     "hf-hub:<owner>/<name> (hf-hub:MahmoodLab/UNI, hf-hub:MahmoodLab/CONCH, "
                                     "hf-hub:timm/resnet50.a1_in1k) for that repository's file through the Hugging "
                                     "Face cache, downloaded when not cached (gated models: `hf auth login` first)")
    p.add_argument("--random-init", action="store_true", help="random weights (tests and benchmarks only)")
    p.add_argument("--augment", action="store_true", help="also store the 8 dihedral views (embeddings_aug)")
    add_runtime_args(p, 64, "patches per forward pass (default 64)")
    p.add_argument("--overwrite", action="store_true", help="recompute finished slices")
    a = p.parse_args()

    # torchrun: a share of slices each
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if a.device == "cuda" and world > 1:
        a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    names = list_slices(a.data)
    with_img = []
    for n in names:                                      # patches stored (`img`), or a slide to crop them from
        with h5py.File(slice_path(a.data, n), "r") as f:
            if "img" in f:
                with_img.append(n)
            elif "slide" in f.attrs:
                slide_of(f, n)                           # every slide is there before anything is written
                with_img.append(n)
    if not with_img:
        raise UserError(f"{a.data}: no slice has an image (stored patches or a slide); nothing to embed")
    if a.encoder == "stain":
        enc, weights_attr = StainEncoder(), "none"
    else:
        path = resolve_weights(a.weights, HUB_FILE[a.encoder]) if a.weights else None
        torch.manual_seed(a.seed)                        # the weights of --random-init
        enc = NeuralEncoder(a.encoder, path, a.random_init, a.device, a.amp)
        weights_attr = "random-init"
        if path:                                         # the hub id, or the local file's name, and the file's hash
            weights_attr = f"{a.weights if path != a.weights else os.path.basename(path)} sha256:{sha256(path)}"
    out_dir = os.path.join(a.data, "features", a.encoder)
    mine = with_img[rank::world]
    for n in tqdm(mine, desc=f"{a.encoder} rank {rank}" if world > 1 else a.encoder, unit="slice"):
        dst = os.path.join(out_dir, f"{n}.h5")
        if not a.overwrite and is_done(dst, a.encoder, weights_attr, a.augment):
            continue
        embed_slice(slice_path(a.data, n), dst, enc, a.batch_size, a.augment, weights_attr)
    print(f"{a.encoder}: {len(mine)} slices -> {out_dir}" + (f" (rank {rank} of {world})" if world > 1 else ""))


if __name__ == "__main__":
    run(main)
