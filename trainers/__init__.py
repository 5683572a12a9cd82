"""advflow.trainers."""
