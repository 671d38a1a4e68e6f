"""Evaluation of a run's synthetic images at a site: quality (domain-FID,
KID, precision/recall, SSIM/PSNR to the nearest real image, realism),
privacy (membership inference, memorization) and utility (TSTR). Entry
point: `fedgan.evaluate.site.evaluate` (`fedgan evaluate`)."""
