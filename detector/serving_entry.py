"""The file MLflow logs as the model's code ("models from code"): loading the model
runs this file instead of unpickling an object, so a model can't smuggle code in a pickle.
Only MLflow imports it."""
import mlflow.models

from detector.serving import AnomalyDetector

mlflow.models.set_model(AnomalyDetector())
