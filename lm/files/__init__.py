"""Files that appear whole or not at all (write-then-rename), for every writer in lm."""
