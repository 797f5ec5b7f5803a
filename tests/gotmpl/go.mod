module finetune/gotmpl

go 1.19
