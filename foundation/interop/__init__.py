"""Import and export of other codes' models (mace-torch), never unpickling in this process."""
