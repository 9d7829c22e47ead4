"""A tracked training run: an SGD classifier on scikit-learn's breast cancer data, epoch by epoch.

Run it from any folder; the run lands in that folder's (or its project's) `.mlnb/mlnb.db`:

    python templates/examples/track_sgd.py
    mlnb runs list
"""
import mlnb
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

params = {"alpha": 1e-4, "epochs": 15, "learning_rate": "optimal", "seed": 0}

X, y = load_breast_cancer(return_X_y=True, as_frame=True)
X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.25, random_state=params["seed"], stratify=y)
scaler = StandardScaler().fit(X_train)  # fitted on the training rows only
X_train, X_val = scaler.transform(X_train), scaler.transform(X_val)

mlnb.seed_everything(params["seed"])
with mlnb.start_run("sgd-breast-cancer", params=params, tags={"dataset": "breast_cancer"}) as run:
    model = SGDClassifier(loss="log_loss", alpha=params["alpha"], learning_rate=params["learning_rate"],
                          random_state=params["seed"])
    for epoch in range(params["epochs"]):
        model.partial_fit(X_train, y_train, classes=[0, 1])
        proba = model.predict_proba(X_val)[:, 1]
        run.log_metrics({"val_loss": log_loss(y_val, proba), "val_auc": roc_auc_score(y_val, proba),
                         "val_accuracy": accuracy_score(y_val, proba > 0.5)}, step=epoch)
    run.output("n_train_rows", len(X_train))
    run.log_model(model)
print(f"tracked run {run.id[:8]}: val_auc={roc_auc_score(y_val, proba):.4f}")
