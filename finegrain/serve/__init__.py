"""`finegrain serve`: a web page and JSON API that answer with the species and where the model looked."""
