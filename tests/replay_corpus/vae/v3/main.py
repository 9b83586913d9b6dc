# Port of pytorch/examples vae/main.py for the replay corpus: MNIST is replaced by tiny
# synthetic 8x8 images made from a seeded generator, the VAE is scaled down (64-32-4), the
# image files are left out, and the script records with flordb_build instead of printing.
import argparse

import torch
import torch.utils.data
from torch import nn, optim
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flordb_build as flor

torch.set_num_threads(1)

parser = argparse.ArgumentParser(description="VAE MNIST Example")
parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                    help="input batch size for training (default: 32)")
parser.add_argument("--epochs", type=int, default=3, metavar="N",
                    help="number of epochs to train (default: 3)")
parser.add_argument("--beta", type=float, default=1.0, metavar="B",
                    help="weight of the KL term (default: 1.0)")
parser.add_argument("--no-accel", action="store_true",
                    help="disables accelerator")
parser.add_argument("--seed", type=int, default=1, metavar="S",
                    help="random seed (default: 1)")
parser.add_argument("--log-interval", type=int, default=2, metavar="N",
                    help="how many batches to wait before logging training status")
args = parser.parse_args()

use_accel = not args.no_accel and torch.accelerator.is_available()

torch.manual_seed(args.seed)


if use_accel:
    device = torch.accelerator.current_accelerator()
else:
    device = torch.device("cpu")


def synthetic_images(n, generator):
    """n 8x8 images in [0, 1]: blurred strokes standing in for handwritten digits."""
    base = torch.rand(n, 1, 8, 8, generator=generator)
    strokes = (base > 0.7).float()
    return TensorDataset(F.avg_pool2d(strokes, 3, stride=1, padding=1).clamp(0, 1), torch.zeros(n))


kwargs = {"num_workers": 1, "pin_memory": True} if use_accel else {}
generator = torch.Generator().manual_seed(0)
train_loader = DataLoader(synthetic_images(192, generator), batch_size=args.batch_size, shuffle=True, **kwargs)
test_loader = DataLoader(synthetic_images(64, generator), batch_size=args.batch_size, shuffle=False, **kwargs)
flor.log("n_train", len(train_loader.dataset))  # hindsight prefix


class VAE(nn.Module):
    def __init__(self):
        super().__init__()

        self.fc1 = nn.Linear(64, 32)
        self.fc21 = nn.Linear(32, 4)
        self.fc22 = nn.Linear(32, 4)
        self.fc3 = nn.Linear(4, 32)
        self.fc4 = nn.Linear(32, 64)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 64))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


model = VAE().to(device)
optimizer = optim.Adam(model.parameters(), lr=2e-3)


# Reconstruction + KL divergence losses summed over all elements and batch
def loss_function(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="sum")

    # see Appendix B from VAE paper:
    # Kingma and Welling. Auto-Encoding Variational Bayes. ICLR, 2014
    # https://arxiv.org/abs/1312.6114
    # 0.5 * sum(1 + log(sigma^2) - mu^2 - sigma^2)
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())

    return BCE + args.beta * KLD


def train(epoch):
    model.train()
    train_loss = 0
    for batch_idx, (data, _) in flor.loop("step", enumerate(train_loader)):
        data = data.to(device)
        optimizer.zero_grad()
        recon_batch, mu, logvar = model(data)
        loss = loss_function(recon_batch, data, mu, logvar)
        flor.log("batch_loss", loss.item())  # hindsight range
        loss.backward()
        train_loss += loss.item()
        optimizer.step()
        if batch_idx % args.log_interval == 0:
            flor.log("loss", loss.item() / len(data))

    flor.log("avg_loss", train_loss / len(train_loader.dataset))


def test(epoch):
    model.eval()
    test_loss = 0
    with torch.no_grad():
        for data, _ in test_loader:
            data = data.to(device)
            recon_batch, mu, logvar = model(data)
            test_loss += loss_function(recon_batch, data, mu, logvar).item()

    test_loss /= len(test_loader.dataset)
    flor.log("test_loss", test_loss)


if __name__ == "__main__":
    with flor.checkpointing(model=model, optimizer=optimizer):
        for epoch in flor.loop("epoch", range(1, args.epochs + 1)):
            train(epoch)
            with torch.no_grad():
                sample = torch.randn(64, 4).to(device)
                sample = model.decode(sample).cpu()
                flor.log("sample_mean", sample.mean().item())  # hindsight validation
            test(epoch)
            flor.log("enc_norm", model.fc1.weight.norm().item())  # hindsight validation
            flor.log("z_probe", model.decode(torch.randn(4, 4)).mean().item())  # hindsight validation draws
    flor.log("decoder_bias", model.fc4.bias.mean().item())  # hindsight suffix
    flor.log("final_sample", model.decode(torch.randn(8, 4)).mean().item())  # hindsight suffix
