# ruff: noqa: B007  (the loop variable is unused, as in the original)
# Port of FlorDB's tutorial train.py (rlnsanz/ml_tutorial, the script FlorDB's README walks
# through) for the replay corpus: MNIST is replaced by tiny synthetic 28x28 "digits" made from a
# seeded generator, the hidden layer is scaled down, `import flor` becomes `import flordb_build
# as flor`, and numpy is seeded with the same seed so that the validation subset is reproducible.
from random import randint

import numpy as np
import torch
import torch.nn as nn
import torch.utils.data as torchdata

import flordb_build as flor

torch.set_num_threads(1)

# Device configuration
device = torch.device(
    flor.arg(
        "device",
        (
            "mps"
            if torch.backends.mps.is_available()
            else "cuda" if torch.cuda.is_available() else "cpu"
        ),
    )
)

seed = flor.arg("seed", default=randint(1, 10000))
torch.manual_seed(seed)
np.random.seed(seed)

# Hyper-parameters
input_size = 784
hidden_size = flor.arg("hidden", default=32)
num_classes = 10
num_epochs = flor.arg("epochs", 3)
batch_size = flor.arg("batch_size", 32)
learning_rate = flor.arg("lr", 1e-3)


def synthetic_mnist(n, generator):
    """n noisy 28x28 images; the class of each decides which 7x7 block is bright."""
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = 0.3 * torch.rand(n, 1, 28, 28, generator=generator)
    for k in range(10):
        row, col = 7 * (k // 4), 7 * (k % 4)
        images[labels == k, 0, row:row + 7, col:col + 7] += 0.7
    return torchdata.TensorDataset(images, labels)


# MNIST dataset
generator = torch.Generator().manual_seed(0)
train_dataset = synthetic_mnist(320, generator)

test_dataset = synthetic_mnist(160, generator)

# Data loader
train_loader = torchdata.DataLoader(
    dataset=train_dataset, batch_size=batch_size, shuffle=True
)

test_loader = torchdata.DataLoader(dataset=test_dataset, batch_size=batch_size)


# Fully connected neural network with one hidden layer
class NeuralNet(nn.Module):
    def __init__(self, input_size, hidden_size, num_classes):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_size, num_classes)

    def forward(self, x):
        out = self.fc1(x)
        out = self.relu(out)  # move ReLU here
        out = self.fc2(out)  # return raw logits for CrossEntropyLoss
        return out


model = NeuralNet(input_size, hidden_size, num_classes).to(device)
flor.log("n_weights", model.fc1.weight.numel() + model.fc2.weight.numel())  # hindsight prefix

# Loss and optimizer
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)


def get_val_loader(fraction=0.2):
    indices = list(range(len(test_dataset)))
    np.random.shuffle(indices)
    split = int(np.floor(fraction * len(test_dataset)))
    subset_indices = indices[:split]
    sampler = torchdata.SubsetRandomSampler(subset_indices)
    return torchdata.DataLoader(test_dataset, sampler=sampler, batch_size=batch_size)


def validate(val_loader: torchdata.DataLoader):
    # Test the model
    # In test phase, we don't need to compute gradients (for memory efficiency)
    with torch.no_grad():
        correct = 0
        total = 0
        for images, labels in val_loader:
            images = images.reshape(-1, 28 * 28).to(device)
            labels = labels.to(device)
            outputs = model(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return int(correct), int(total)


print_every = flor.arg("print_every", 3)

with flor.checkpointing(model=model, optimizer=optimizer):
    for epoch in flor.loop("epoch", range(num_epochs)):
        flor.log("gradient_norm", torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf")).item())  # hindsight validation
        for i, (images, labels) in flor.loop("step", enumerate(train_loader)):
            # Move tensors to the configured device
            images = images.reshape(-1, 28 * 28).to(device)
            labels = labels.to(device)

            # Forward pass
            outputs = model(images)
            loss = criterion(outputs, labels)
            flor.log("batch_loss", loss.item())  # hindsight range

            # Backward and optimize
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            if (i + 1) % print_every == 0:
                flor.log("loss", loss.item())

        correct, total = validate(get_val_loader())
        flor.log("val_acc", 100 * correct / total)
        flor.log("test_logit", model(next(iter(test_loader))[0].reshape(-1, 28 * 28)).mean().item())  # hindsight validation draws


correct, total = validate(test_loader)
flor.log("accuracy", 100 * correct / total)
flor.log("correct", correct)
flor.log("fc2_norm", model.fc2.weight.norm().item())  # hindsight suffix
flor.log("error_rate", 1 - correct / total)  # hindsight suffix
