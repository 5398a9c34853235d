"""Training losses: the entropic partial optimal-transport alignment of Med3DInsight."""
