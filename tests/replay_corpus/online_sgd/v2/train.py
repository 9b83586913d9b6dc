# ruff: noqa: B007  (the loop variable is unused, as in the original)
# Online learning with scikit-learn in the style of its out-of-core examples
# (examples/applications/plot_out_of_core_classification.py): a stream of mini-batches feeds
# SGDRegressor.partial_fit, with a StandardScaler fitted incrementally beside it. The data is a
# synthetic linear regression problem made from a seeded generator.
import argparse

import numpy as np
from sklearn.linear_model import SGDRegressor
from sklearn.metrics import mean_squared_error, r2_score
from sklearn.preprocessing import StandardScaler

import flordb_build as flor

parser = argparse.ArgumentParser(description="Online linear regression with SGDRegressor.partial_fit")
parser.add_argument("--epochs", type=int, default=4, help="passes over the stream")
parser.add_argument("--batch-size", type=int, default=32, help="samples per partial_fit call")
parser.add_argument("--eta0", type=float, default=0.01, help="initial learning rate")
parser.add_argument("--alpha", type=float, default=1e-3, help="L2 regularization strength")
parser.add_argument("--n-samples", type=int, default=640, help="size of the synthetic data set")
parser.add_argument("--noise", type=float, default=0.5, help="standard deviation of the target noise")
parser.add_argument("--seed", type=int, default=0, help="random seed")
args = parser.parse_args()

rng = np.random.RandomState(args.seed)
n_features = 8
true_coef = rng.uniform(-3, 3, size=n_features)
X = rng.normal(size=(args.n_samples, n_features)) * rng.uniform(0.5, 5, size=n_features)
y = X @ true_coef + 4.0 + args.noise * rng.normal(size=args.n_samples)
n_test = args.n_samples // 5
X_train, y_train, X_test, y_test = X[n_test:], y[n_test:], X[:n_test], y[:n_test]
flor.log("n_train", len(X_train))  # hindsight prefix


def iter_minibatches(X, y, batch_size):
    """Shuffled mini-batches of (X, y), as a stream reader would yield them."""
    order = rng.permutation(len(X))
    for start in range(0, len(X), batch_size):
        rows = order[start:start + batch_size]
        yield X[rows], y[rows]


scaler = StandardScaler()
reg = SGDRegressor(eta0=args.eta0, alpha=args.alpha, learning_rate="invscaling", random_state=args.seed)

with flor.checkpointing(reg=reg, scaler=scaler):
    for epoch in flor.loop("epoch", range(args.epochs)):
        for X_batch, y_batch in flor.loop("step", iter_minibatches(X_train, y_train, args.batch_size)):
            scaler.partial_fit(X_batch)
            reg.partial_fit(scaler.transform(X_batch), y_batch)
            flor.log("batch_mse", mean_squared_error(y_batch, reg.predict(scaler.transform(X_batch))))  # hindsight range
        val_mse = mean_squared_error(y_test, reg.predict(scaler.transform(X_test)))
        flor.log("val_mse", val_mse)
        flor.log("val_r2", r2_score(y_test, reg.predict(scaler.transform(X_test))))
        flor.log("coef_norm", float(np.linalg.norm(reg.coef_)))  # hindsight validation
        flor.log("updates", int(reg.t_))  # hindsight validation

flor.log("r2", r2_score(y_test, reg.predict(scaler.transform(X_test))))
flor.log("coef0", float(reg.coef_[0]))  # hindsight suffix
flor.log("scaler_mean0", float(scaler.mean_[0]))  # hindsight suffix
