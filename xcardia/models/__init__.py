"""Networks: the 3D CT image encoder, the tabular encoder, the pretraining model and encoder weight files."""
