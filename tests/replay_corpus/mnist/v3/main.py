# Port of pytorch/examples mnist/main.py for the replay corpus: MNIST is replaced by tiny
# synthetic 8x8 "digits" made from a seeded generator, the network is scaled down, and the
# script records with flordb_build (flor.loop, flor.checkpointing, flor.log instead of print).
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

import flordb_build as flor

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.conv2 = nn.Conv2d(4, 8, 3, 1)
        self.dropout1 = nn.Dropout(0.1)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def synthetic_digits(n, generator):
    """n noisy 8x8 images; the class of each decides which 2x2 block is bright."""
    target = torch.randint(0, 10, (n,), generator=generator)
    data = 0.5 * torch.randn(n, 1, 8, 8, generator=generator)
    rows, cols = 2 * (target // 4), 2 * (target % 4)
    for dr in (0, 1):
        for dc in (0, 1):
            data[torch.arange(n), 0, rows + dr, cols + dc] += 2.0
    return TensorDataset(data, target)


def train(args, model, device, train_loader, optimizer, epoch):
    model.train()
    for batch_idx, (data, target) in flor.loop("step", enumerate(train_loader)):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        flor.log("step_loss", loss.item())  # hindsight range
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0:
            flor.log("loss", loss.item())
            if args.dry_run:
                break


def test(model, device, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()  # sum up batch loss
            pred = output.argmax(dim=1, keepdim=True)  # get the index of the max log-probability
            correct += pred.eq(target.view_as(pred)).sum().item()

    test_loss /= len(test_loader.dataset)
    flor.log("test_loss", test_loss)
    flor.log("accuracy", 100.0 * correct / len(test_loader.dataset))


def main():
    # Training settings
    parser = argparse.ArgumentParser(description="PyTorch MNIST Example")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                        help="input batch size for training (default: 32)")
    parser.add_argument("--test-batch-size", type=int, default=100, metavar="N",
                        help="input batch size for testing (default: 100)")
    parser.add_argument("--epochs", type=int, default=3, metavar="N",
                        help="number of epochs to train (default: 3)")
    parser.add_argument("--lr", type=float, default=1.0, metavar="LR",
                        help="learning rate (default: 1.0)")
    parser.add_argument("--gamma", type=float, default=0.7, metavar="M",
                        help="Learning rate step gamma (default: 0.7)")
    parser.add_argument("--weight-decay", type=float, default=0.0, metavar="WD",
                        help="Adadelta weight decay (default: 0.0)")
    parser.add_argument("--no-accel", action="store_true",
                        help="disables accelerator")
    parser.add_argument("--dry-run", action="store_true",
                        help="quickly check a single pass")
    parser.add_argument("--seed", type=int, default=1, metavar="S",
                        help="random seed (default: 1)")
    parser.add_argument("--log-interval", type=int, default=2, metavar="N",
                        help="how many batches to wait before logging training status")
    parser.add_argument("--save-model", action="store_true",
                        help="For Saving the current Model")
    args = parser.parse_args()

    use_accel = not args.no_accel and torch.accelerator.is_available()

    torch.manual_seed(args.seed)
    flor.log("gamma", args.gamma)  # hindsight prefix

    if use_accel:
        device = torch.accelerator.current_accelerator()
    else:
        device = torch.device("cpu")

    train_kwargs = {"batch_size": args.batch_size}
    test_kwargs = {"batch_size": args.test_batch_size}
    if use_accel:
        accel_kwargs = {"num_workers": 1,
                        "persistent_workers": True,
                        "pin_memory": True,
                        "shuffle": True}
        train_kwargs.update(accel_kwargs)
        test_kwargs.update(accel_kwargs)

    generator = torch.Generator().manual_seed(0)
    train_set = synthetic_digits(256, generator)
    test_set = synthetic_digits(128, generator)
    train_loader = DataLoader(train_set, **train_kwargs)
    test_loader = DataLoader(test_set, **test_kwargs)

    model = Net().to(device)
    flor.log("n_params", sum(p.numel() for p in model.parameters()))  # hindsight prefix
    flor.log("train_size", len(train_set))  # hindsight prefix
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    with flor.checkpointing(model=model, optimizer=optimizer, scheduler=scheduler):
        for epoch in flor.loop("epoch", range(1, args.epochs + 1)):
            flor.log("grad_norm", torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item())  # hindsight validation
            train(args, model, device, train_loader, optimizer, epoch)
            test(model, device, test_loader)
            scheduler.step()
            flor.log("lr", scheduler.get_last_lr()[0])  # hindsight validation
    flor.log("final_lr", scheduler.get_last_lr()[0])  # hindsight suffix

    if args.save_model:
        torch.save(model.state_dict(), "mnist_cnn.pt")


if __name__ == "__main__":
    main()
