# Port of pytorch/examples mnist_forward_forward/main.py (after Mohammad Pezeshki's
# pytorch_forward_forward, MIT License) for the replay corpus: MNIST is replaced by tiny
# synthetic 8x8 digits, the layers are scaled down, the script seeds torch with --seed (the
# original parses it but never uses it) and records with flordb_build instead of printing.
import argparse

import torch
import torch.nn as nn
from torch.optim import Adam
from torch.utils.data import DataLoader, TensorDataset

import flordb_build as flor

torch.set_num_threads(1)


def get_y_neg(y):
    y_neg = y.clone()
    for idx, y_samp in enumerate(y):
        allowed_indices = list(range(10))
        allowed_indices.remove(y_samp.item())
        y_neg[idx] = torch.tensor(allowed_indices)[
            torch.randint(len(allowed_indices), size=(1,))
        ].item()
    return y_neg.to(device)


def overlay_y_on_x(x, y, classes=10):
    x_ = x.clone()
    x_[:, :classes] *= 0.0
    x_[range(x.shape[0]), y] = x.max()
    return x_


def synthetic_digits(n, generator):
    """n flattened 8x8 images; the class of each decides which 2x2 block is bright."""
    target = torch.randint(0, 10, (n,), generator=generator)
    data = 0.5 * torch.randn(n, 8, 8, generator=generator)
    rows, cols = 2 * (target // 4), 2 * (target % 4)
    for dr in (0, 1):
        for dc in (0, 1):
            data[torch.arange(n), rows + dr, cols + dc] += 2.0
    return TensorDataset(torch.flatten(data, 1), target)


class Net(torch.nn.Module):
    def __init__(self, dims):

        super().__init__()
        self.layers = []
        for d in range(len(dims) - 1):
            self.layers = self.layers + [Layer(dims[d], dims[d + 1]).to(device)]

    def predict(self, x):
        goodness_per_label = []
        for label in range(10):
            h = overlay_y_on_x(x, label)
            goodness = []
            for layer in self.layers:
                h = layer(h)
                goodness = goodness + [h.pow(2).mean(1)]
            goodness_per_label += [sum(goodness).unsqueeze(1)]
        goodness_per_label = torch.cat(goodness_per_label, 1)
        return goodness_per_label.argmax(1)

    def train(self, x_pos, x_neg):
        h_pos, h_neg = x_pos, x_neg
        for i, layer in flor.loop("layer", enumerate(self.layers)):
            print("training layer: ", i)
            h_pos, h_neg = layer.train(h_pos, h_neg)
            flor.log("h_pos_norm", h_pos.norm().item())  # hindsight validation
            flor.log("layer_bias", layer.bias.mean().item())  # hindsight validation


class Layer(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.relu = torch.nn.ReLU()
        self.opt = Adam(self.parameters(), lr=args.lr)
        self.threshold = args.threshold
        self.num_epochs = args.epochs

    def forward(self, x):
        x_direction = x / (x.norm(2, 1, keepdim=True) + 1e-4)
        return self.relu(torch.mm(x_direction, self.weight.T) + self.bias.unsqueeze(0))

    def train(self, x_pos, x_neg):
        for i in flor.loop("epoch", range(self.num_epochs)):
            g_pos = self.forward(x_pos).pow(2).mean(1)
            g_neg = self.forward(x_neg).pow(2).mean(1)
            flor.log("g_gap", (g_pos.mean() - g_neg.mean()).item())  # hindsight range
            loss = torch.log1p(
                torch.exp(
                    torch.cat([-g_pos + self.threshold, g_neg - self.threshold])
                )
            ).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            if i % args.log_interval == 0:
                flor.log("loss", loss.item())
                flor.log("goodness_pos", g_pos.mean().item())
        return self.forward(x_pos).detach(), self.forward(x_neg).detach()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--epochs",
        type=int,
        default=60,
        metavar="N",
        help="number of epochs to train (default: 60)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=0.03,
        metavar="LR",
        help="learning rate (default: 0.03)",
    )
    parser.add_argument(
        "--no_accel", action="store_true", help="disables accelerator"
    )
    parser.add_argument(
        "--seed", type=int, default=1, metavar="S", help="random seed (default: 1)"
    )
    parser.add_argument(
        "--train_size", type=int, default=256, help="size of training set"
    )
    parser.add_argument(
        "--threshold", type=float, default=1.5, help="threshold for training"
    )
    parser.add_argument("--test_size", type=int, default=128, help="size of test set")
    parser.add_argument(
        "--save-model",
        action="store_true",
        help="For Saving the current Model",
    )
    parser.add_argument(
        "--log-interval",
        type=int,
        default=10,
        metavar="N",
        help="how many batches to wait before logging training status",
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    flor.log("threshold", args.threshold)  # hindsight prefix
    use_accel = not args.no_accel and torch.accelerator.is_available()
    if use_accel:
        device = torch.accelerator.current_accelerator()
    else:
        device = torch.device("cpu")

    train_kwargs = {"batch_size": args.train_size}
    test_kwargs = {"batch_size": args.test_size}

    if use_accel:
        accel_kwargs = {"num_workers": 1, "pin_memory": True, "shuffle": True}
        train_kwargs.update(accel_kwargs)
        test_kwargs.update(accel_kwargs)

    generator = torch.Generator().manual_seed(0)
    train_loader = DataLoader(synthetic_digits(args.train_size, generator), **train_kwargs)
    test_loader = DataLoader(synthetic_digits(args.test_size, generator), **test_kwargs)
    net = Net([64, 32, 32])
    flor.log("n_layers", len(net.layers))  # hindsight prefix
    x, y = next(iter(train_loader))
    x, y = x.to(device), y.to(device)
    x_pos = overlay_y_on_x(x, y)
    y_neg = get_y_neg(y)
    x_neg = overlay_y_on_x(x, y_neg)
    with flor.checkpointing(model=net):
        net.train(x_pos, x_neg)
    flor.log("train_acc", net.predict(x).eq(y).float().mean().item())  # hindsight suffix
    flor.log("train_error", 1.0 - net.predict(x).eq(y).float().mean().item())
    x_te, y_te = next(iter(test_loader))
    x_te, y_te = x_te.to(device), y_te.to(device)
    if args.save_model:
        torch.save(net.state_dict(), "mnist_ff.pt")
    flor.log("test_error", 1.0 - net.predict(x_te).eq(y_te).float().mean().item())
