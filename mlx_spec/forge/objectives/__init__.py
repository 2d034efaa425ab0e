"""One forge objective per drafter family, each named by its family's registration (families.Family.forge):
mtp.py (Google's MTP assistants), dflash.py (z-lab's DFlash), dspark.py (DeepSeek's DSpark), eagle3.py
(EAGLE-3 in the Speculators layout); blocks.py is what the two block drafters share. The contract every
module keeps is forge/objective.py's."""
