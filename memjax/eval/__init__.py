"""Evaluation reports: figures and tables from run directories, and the needle-in-a-haystack grid."""
