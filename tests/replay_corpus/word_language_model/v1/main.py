# ruff: noqa: B007, I001  (the original keeps its own modules apart from the libraries)
# Port of pytorch/examples word_language_model/main.py for the replay corpus: Wikitext-2 is
# replaced by data.Corpus's synthetic sentences, the model is scaled down, the Transformer and
# ONNX export are left out, and the script records with flordb_build instead of printing.
import argparse
import math
import time

import torch
import torch.nn as nn

import data
from model import RNNModel

import flordb_build as flor

torch.set_num_threads(1)

parser = argparse.ArgumentParser(description="PyTorch RNN/LSTM/GRU Language Model")
parser.add_argument("--model", type=str, default="LSTM",
                    help="type of network (RNN_TANH, RNN_RELU, LSTM, GRU)")
parser.add_argument("--emsize", type=int, default=16,
                    help="size of word embeddings")
parser.add_argument("--nhid", type=int, default=16,
                    help="number of hidden units per layer")
parser.add_argument("--nlayers", type=int, default=2,
                    help="number of layers")
parser.add_argument("--lr", type=float, default=50,
                    help="initial learning rate")
parser.add_argument("--clip", type=float, default=0.25,
                    help="gradient clipping")
parser.add_argument("--epochs", type=int, default=4,
                    help="upper epoch limit")
parser.add_argument("--batch_size", type=int, default=10, metavar="N",
                    help="batch size")
parser.add_argument("--bptt", type=int, default=8,
                    help="sequence length")
parser.add_argument("--dropout", type=float, default=0.2,
                    help="dropout applied to layers (0 = no dropout)")
parser.add_argument("--tied", action="store_true",
                    help="tie the word embedding and softmax weights")
parser.add_argument("--seed", type=int, default=1111,
                    help="random seed")
parser.add_argument("--log-interval", type=int, default=3, metavar="N",
                    help="report interval")
parser.add_argument("--save", type=str, default="model.pt",
                    help="path to save the final model")
parser.add_argument("--dry-run", action="store_true",
                    help="verify the code and the model")
args = parser.parse_args()

# Set the random seed manually for reproducibility.
torch.manual_seed(args.seed)

device = torch.device("cpu")

###############################################################################
# Load data
###############################################################################

corpus = data.Corpus(seed=0)


def batchify(data, bsz):
    # Work out how cleanly we can divide the dataset into bsz parts.
    nbatch = data.size(0) // bsz
    # Trim off any extra elements that wouldn't cleanly fit (remainders).
    data = data.narrow(0, 0, nbatch * bsz)
    # Evenly divide the data across the bsz batches.
    data = data.view(bsz, -1).t().contiguous()
    return data.to(device)


eval_batch_size = 10
train_data = batchify(corpus.train, args.batch_size)
val_data = batchify(corpus.valid, eval_batch_size)
test_data = batchify(corpus.test, eval_batch_size)

###############################################################################
# Build the model
###############################################################################

ntokens = len(corpus.dictionary)
flor.log("ntokens", ntokens)  # hindsight prefix
model = RNNModel(args.model, ntokens, args.emsize, args.nhid, args.nlayers, args.dropout, args.tied).to(device)

criterion = nn.NLLLoss()

###############################################################################
# Training code
###############################################################################


def repackage_hidden(h):
    """Wraps hidden states in new Tensors, to detach them from their history."""

    if isinstance(h, torch.Tensor):
        return h.detach()
    else:
        return tuple(repackage_hidden(v) for v in h)


def get_batch(source, i):
    seq_len = min(args.bptt, len(source) - 1 - i)
    data = source[i:i + seq_len]
    target = source[i + 1:i + 1 + seq_len].view(-1)
    return data, target


def evaluate(data_source):
    # Turn on evaluation mode which disables dropout.
    model.eval()
    total_loss = 0.
    hidden = model.init_hidden(eval_batch_size)
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, args.bptt):
            data, targets = get_batch(data_source, i)
            output, hidden = model(data, hidden)
            hidden = repackage_hidden(hidden)
            total_loss += len(data) * criterion(output, targets).item()
    return total_loss / (len(data_source) - 1)


def train():
    # Turn on training mode which enables dropout.
    model.train()
    total_loss = 0.
    hidden = model.init_hidden(args.batch_size)
    for batch, i in flor.loop("step", enumerate(range(0, train_data.size(0) - 1, args.bptt))):
        data, targets = get_batch(train_data, i)
        # Starting each batch, we detach the hidden state from how it was previously produced.
        # If we didn't, the model would try backpropagating all the way to start of the dataset.
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        flor.log("batch_loss", loss.item())  # hindsight range
        loss.backward()

        # `clip_grad_norm` helps prevent the exploding gradient problem in RNNs / LSTMs.
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)

        total_loss += loss.item()

        if batch % args.log_interval == 0 and batch > 0:
            cur_loss = total_loss / args.log_interval
            flor.log("loss", cur_loss)
            total_loss = 0
        if args.dry_run:
            break


# Loop over epochs.
lr = args.lr
best_val_loss = None

# At any point you can hit Ctrl + C to break out of training early.
with flor.checkpointing(model=model):
    try:
        for epoch in flor.loop("epoch", range(1, args.epochs + 1)):
            epoch_start_time = time.time()
            flor.log("lr_now", lr)  # hindsight validation
            train()
            val_loss = evaluate(val_data)
            flor.log("val_loss", val_loss)
            # Save the model if the validation loss is the best we've seen so far.
            if not best_val_loss or val_loss < best_val_loss:
                with open(args.save, "wb") as f:
                    torch.save(model, f)
                best_val_loss = val_loss
            else:
                # Anneal the learning rate if no improvement has been seen in the validation dataset.
                lr /= 4.0
            flor.log("best_val", best_val_loss)  # hindsight validation
    except KeyboardInterrupt:
        print("-" * 89)
        print("Exiting from training early")
flor.log("final_lr", lr)  # hindsight suffix

# Load the best saved model.
with open(args.save, "rb") as f:
    safe_globals = [
        RNNModel,
        torch.nn.modules.dropout.Dropout,
        torch.nn.modules.linear.Linear,
        torch.nn.modules.rnn.GRU,
        torch.nn.modules.rnn.LSTM,
        torch.nn.modules.rnn.RNN,
        torch.nn.modules.sparse.Embedding,
    ]
    with torch.serialization.safe_globals(safe_globals):
        model = torch.load(f)
    # after load the rnn params are not a continuous chunk of memory
    # this makes them a continuous chunk, and will speed up forward pass
    model.rnn.flatten_parameters()
flor.log("best_file_val", evaluate(val_data))  # hindsight suffix

# Run on test data.
test_loss = evaluate(test_data)
flor.log("test_loss", test_loss)
flor.log("test_ppl", math.exp(test_loss))
flor.log("test_bpc", test_loss / math.log(2))  # hindsight suffix
