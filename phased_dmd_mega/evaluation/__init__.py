"""``phased-dmd evaluate``: diversity and motion of sample folders (command.py).

samples.py reads the folders ``phased-dmd sample`` writes; statistics.py holds the model-free
statistics, on tensors only (a training-time collapse monitor calls them on samples in memory);
dino.py, lpips.py and motion.py the model metrics; grid.py the prompts x seeds picture (an array,
for a file or TensorBoard); report.py the files written to --out."""
