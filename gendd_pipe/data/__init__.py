"""Image shards (WebDataset tars), replayable views and the data sets that ship with packages."""
