"""Study list, study and viewer pages: see the web portal issue."""
