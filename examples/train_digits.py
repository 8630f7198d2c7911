"""Train a small ViT from scratch on scikit-learn's handwritten digits (shipped inside the package).

    python examples/train_digits.py                  # CPU, PyTorch path: ~30 s, 99.2% test accuracy
    python examples/train_digits.py --device cuda    # GPU, the fused Triton kernels

1,797 digit images of 8x8 pixels (values 0-16), upsampled to 32x32 uint8 images: 80% for training,
20% held out for testing. The ViT cuts them into a 4x4 grid of 8x8 patches (16 tokens + a class
token), width 64, 4 blocks of 4 heads, and normalizes the uint8 images itself. Training: 30 epochs
of AdamW, warmup + cosine learning rate, label smoothing, small random shifts as augmentation.
Shows a progress bar with the test accuracy after each epoch, and saves a loss / accuracy plot
(train_digits.png) and the weights (train_digits.pth) in --out. Measured on 2 CPU cores: 99.2%
test accuracy with the default seed 0 in 27 s (98.3% with --seed 1).
"""
import argparse
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import vit_fast
from vit_fast.optimization import warmup_cosine


def load_digits(seed):
    """(train images, train labels, test images, test labels): uint8 [N, 1, 32, 32] and int64 [N]."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = (images * 255).round().clamp(0, 255).to(torch.uint8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train, test = train_test_split(range(len(labels)), test_size=0.2, stratify=digits.target, random_state=seed)
    return images[train], labels[train], images[test], labels[test]


def random_shift(images, max_shift=3):
    """Each image moved by up to ``max_shift`` pixels along each axis, the border filled with 0."""
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def accuracy(model, images, labels, device, batch_size=512):
    model.eval()
    hits = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        hits += (logits.argmax(dim=1).cpu() == labels[start:start + batch_size]).sum().item()
    return hits / len(labels)


def save_plot(path, losses, steps_per_epoch, test_accuracy):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([step / steps_per_epoch for step in range(len(losses))], losses, linewidth=0.8)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    ax_acc.plot(range(1, len(test_accuracy) + 1), test_accuracy, marker="o")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.02), title="held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a small ViT on scikit-learn's 8x8 digits.")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--patch-size", type=int, default=8, help="8: 4x4 patches of 32x32 images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests)")
    parser.add_argument("--out", default=".", help="folder for train_digits.png and train_digits.pth")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    train_x, train_y, test_x, test_y = load_digits(args.seed)
    model = vit_fast.VisionTransformer(img_size=32, patch_size=args.patch_size, in_chans=1, num_classes=10,
                                       embed_dim=64, depth=args.depth, num_heads=4, mlp_ratio=2.0,
                                       drop_path_rate=0.1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = -(-len(train_y) // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps_per_epoch, total_steps))

    losses, test_accuracy = [], []
    bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y))
        for start in range(0, len(order), args.batch_size):
            if len(losses) == total_steps:
                break
            batch = order[start:start + args.batch_size]
            images, labels = random_shift(train_x[batch]).to(device), train_y[batch].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(images).float(), labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}",
                            test_acc=f"{test_accuracy[-1]:.3f}" if test_accuracy else "-")
        test_accuracy.append(accuracy(model, test_x, test_y, device))
        if len(losses) == total_steps:
            break
    bar.close()

    os.makedirs(args.out, exist_ok=True)
    save_plot(os.path.join(args.out, "train_digits.png"), losses, steps_per_epoch, test_accuracy)
    torch.save(model.state_dict(), os.path.join(args.out, "train_digits.pth"))
    print(f"test accuracy after {len(test_accuracy)} epochs: {test_accuracy[-1]:.4f} "
          f"({len(test_y)} held-out images); plot and weights in {os.path.abspath(args.out)}")
    return test_accuracy[-1]


if __name__ == "__main__":
    main()
