"""Recipes, kept apart from the library as Lightning keeps ``lightning.pytorch.demos``: the DataModules
(:mod:`~lightning_stthree.recipes.data`), the example models (:mod:`~lightning_stthree.recipes.models`) and the
``stthree`` command (:mod:`~lightning_stthree.recipes.cli`, with its embedded ``configs/default.yaml``). The callbacks
never import them; they need the ``cli`` extra (``torchvision``, ``scikit-learn``, ``jsonargparse``)."""
