"""What an entry point does around its work: holding its run folder, and ending well on a scheduler's signal."""
