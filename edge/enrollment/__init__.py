"""The box's side of onboarding: enrollment with a claim code, its first envelope, and certificate renewal."""
