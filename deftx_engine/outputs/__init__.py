"""What is made from trained vectors: the composed model's predictions and metrics (``deftx evaluate``,
``predict``), Plotly figures, and the ``deftx inspect`` report."""
